-- A resumed focus reads what its wait ended with; it does not take it.
--
-- The signal that wakes a waiting item is the one its wait takes (the first of that event
-- to arrive while it waits), so animus.signal and animus.signal_many mark it taken by the
-- wait's step position as they wake the item, in the same transaction. The attempt that
-- resumes then reads its steps and that signal in one query (no lock, no write), and the
-- wait's step, whose outcome the database holds already, is recorded with the attempt's next
-- write (animus.record_steps: its next step, its suspension, its failure, or in the batch of
-- its completion) instead of in a round trip and a commit of its own. A later attempt that
-- finds the step unrecorded reads the same signal again.

-- As in 0017, and: the signal that wakes the item is taken by its wait's position.
CREATE OR REPLACE FUNCTION animus.signal(p_id uuid, p_event text, p_payload jsonb)
RETURNS TABLE (signal_id bigint, woke bool)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_id);
    v_wakes bool;
    v_signal bigint;
BEGIN
    IF v_item.state IN ('completed', 'dead', 'merged', 'cancelled') THEN
        RAISE EXCEPTION 'work item % is %: a finished item takes no signals', p_id, v_item.state
            USING ERRCODE = 'ANI01';
    END IF;
    v_wakes := v_item.state = 'waiting' AND v_item.wait->>'kind' = 'event'
               AND v_item.wait->>'event' = p_event;
    INSERT INTO animus.signals (work_id, event, payload, consumed_by_position, consumed_at)
    VALUES (p_id, p_event, p_payload,
            CASE WHEN v_wakes THEN (v_item.wait->>'position')::int END,
            CASE WHEN v_wakes THEN now() END)
    RETURNING id INTO v_signal;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (p_id, 'signal', v_item.state, v_item.state,
            JSON_OBJECT('source': v_item.source, 'actor': animus.actor()
                        ABSENT ON NULL RETURNING jsonb),
            jsonb_build_object('signal', v_signal, 'event', p_event, 'sent_by', session_user));
    IF v_wakes THEN
        UPDATE animus.work_items w
           SET state = 'queued', updated_at = now(),
               reason = format('woken: signal %s arrived', quote_literal(p_event))
         WHERE w.id = p_id RETURNING w.* INTO v_item;
        PERFORM animus.wake_message(v_item);
        RETURN QUERY SELECT v_signal, true;
    ELSE
        RETURN QUERY SELECT v_signal, false;
    END IF;
END
$$;

-- As in 0020, and: a signal that arrived before the wait is taken by it as the item is
-- woken at once (an attempt reaching a wait for the first time does not look for one: it
-- suspends, and the suspension finds it).
CREATE OR REPLACE FUNCTION animus.suspend(p_id uuid, p_msg_id bigint, p_lease int, p_wait jsonb,
                                          p_wake_at timestamptz, p_duration_ms bigint,
                                          p_execution jsonb)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items;
    v_event text := quote_literal(coalesce(p_wait->>'event', '?'));
    v_kind text := p_wait->>'kind';
    v_children text;
    v_woken text;
BEGIN
    IF jsonb_typeof(p_wait) IS DISTINCT FROM 'object'
       OR v_kind IS NULL OR v_kind NOT IN ('sleep', 'event', 'approval', 'children')
       OR (v_kind = 'sleep' AND p_wake_at IS NULL)
       OR (v_kind = 'children' AND (jsonb_typeof(p_wait->'children') IS DISTINCT FROM 'array'
                                    OR jsonb_array_length(p_wait->'children') = 0)) THEN
        RAISE EXCEPTION 'work item %: a wait is {"kind": "sleep" (with a wake time), '
                        '"event", "approval" or "children" (with the ids of the children), '
                        '...}, got %', p_id, coalesce(p_wait::text, 'null')
            USING ERRCODE = 'ANI01';
    END IF;
    IF v_kind = 'children' THEN
        v_children := animus.children_text(p_wait);
        -- Its children (and the items they were merged into) are locked before the item:
        -- a child being finished now is waited for, and one finished after this suspension
        -- commits sees the item waiting. (The other way round would deadlock with a child
        -- whose finish checks its parent key, a row it updated twice.)
        PERFORM 1 FROM animus.work_items w
         WHERE w.id IN (SELECT c.id::uuid FROM jsonb_array_elements_text(p_wait->'children') c(id)
                        UNION
                        SELECT k.merged_into FROM animus.work_items k
                         WHERE k.id IN (SELECT c.id::uuid
                                          FROM jsonb_array_elements_text(p_wait->'children') c(id))
                           AND k.merged_into IS NOT NULL)
         ORDER BY w.id
           FOR SHARE OF w;
    END IF;
    v_item := animus.held_item(p_id, p_msg_id, p_lease);
    PERFORM animus.require_transition(p_id, v_item.state, 'waiting');
    IF v_kind = 'approval' AND (
           jsonb_typeof(p_wait->'position') IS DISTINCT FROM 'number'
           OR coalesce(btrim(p_wait->>'why'), '') = ''
           OR coalesce(p_wait->>'role', '') NOT IN ('reader', 'submitter', 'approver',
                                                    'operator', 'admin')
           OR jsonb_typeof(p_wait->'quorum') IS DISTINCT FROM 'number'
           OR (p_wait->>'quorum')::numeric < 1
           OR (p_wait->>'quorum')::numeric <> trunc((p_wait->>'quorum')::numeric)) THEN
        RAISE EXCEPTION 'work item %: an approval waits with a position, a why, a role (reader, '
                        'submitter, approver, operator or admin) and a quorum of 1 or more, got %',
                        p_id, p_wait::text
            USING ERRCODE = 'ANI01';
    END IF;
    UPDATE animus.work_items w
       SET state = 'waiting', wait = p_wait, wake_at = p_wake_at, lease = NULL,
           suspensions = w.suspensions + 1, duration_ms = p_duration_ms, updated_at = now(),
           reason = CASE WHEN v_kind = 'sleep'
                         THEN format('sleeping until %s', p_wait->>'until')
                         WHEN v_kind = 'approval'
                         THEN format('awaiting approval (%s x %s): %s', p_wait->>'quorum',
                                     p_wait->>'role', p_wait->>'why')
                              || coalesce(' (until ' || (p_wait->>'until') || ')', '')
                         WHEN v_kind = 'children'
                         THEN format('waiting for %s', v_children)
                              || coalesce(' until ' || (p_wait->>'until'), '')
                         WHEN p_wake_at IS NULL THEN format('waiting for %s', v_event)
                         ELSE format('waiting for %s until %s', v_event, p_wait->>'until') END
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM animus.record_execution(p_execution);
    IF v_kind = 'event' THEN
        -- a signal that arrived before the wait (the first not taken): the wait takes it
        -- and the item is woken at once
        UPDATE animus.signals s SET consumed_by_position = (p_wait->>'position')::int,
                                    consumed_at = now()
         WHERE s.id = (SELECT f.id FROM animus.signals f
                        WHERE f.work_id = p_id AND f.event = p_wait->>'event'
                          AND f.consumed_by_position IS NULL
                        ORDER BY f.id LIMIT 1);
        IF FOUND THEN
            v_woken := format('woken: signal %s had arrived', v_event);
        END IF;
    ELSIF v_kind = 'children' AND NOT animus.children_unfinished(p_wait) THEN
        -- they finished after the attempt last looked: woken at once
        v_woken := format('woken: its %s had finished', v_children);
    END IF;
    IF v_woken IS NOT NULL THEN
        UPDATE animus.work_items w
           SET state = 'queued', updated_at = now(), reason = v_woken
         WHERE w.id = p_id RETURNING w.* INTO v_item;
        PERFORM animus.wake_message(v_item);
        RETURN NEXT v_item;
        RETURN;
    END IF;
    PERFORM pgmq.set_vt(v_item.queue, p_msg_id, coalesce(p_wake_at, 'infinity'));
    PERFORM pg_notify('animus_work', json_build_object(
                'queue', v_item.queue, 'work_types', json_build_array(v_item.work_type),
                'wake_at', p_wake_at)::text);
    RETURN NEXT v_item;
END
$$;

-- As in 0017, but an attempt that finds no signal to take reads it without locking its item
-- (it returns nothing, and the suspension that follows checks the lease; a signal that
-- arrives in between is taken by that suspension).
CREATE OR REPLACE FUNCTION animus.take_signal(p_id uuid, p_msg_id bigint, p_lease int,
                                              p_event text, p_position int)
RETURNS SETOF animus.signals
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items;
    v_signal animus.signals;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM animus.signals s
                    WHERE s.work_id = p_id AND s.event = p_event
                      AND (s.consumed_by_position IS NULL
                           OR s.consumed_by_position = p_position)) THEN
        RETURN;
    END IF;
    v_item := animus.held_item(p_id, p_msg_id, p_lease);
    IF v_item.state <> 'running' THEN
        RAISE EXCEPTION 'work item % is %: only a running attempt takes signals',
            p_id, v_item.state USING ERRCODE = 'ANI01';
    END IF;
    SELECT * INTO v_signal FROM animus.signals s
     WHERE s.work_id = p_id AND s.event = p_event AND s.consumed_by_position = p_position;
    IF FOUND THEN
        RETURN NEXT v_signal;
        RETURN;
    END IF;
    RETURN QUERY
        UPDATE animus.signals s SET consumed_by_position = p_position, consumed_at = now()
         WHERE s.id = (SELECT f.id FROM animus.signals f
                        WHERE f.work_id = p_id AND f.event = p_event
                          AND f.consumed_by_position IS NULL
                        ORDER BY f.id LIMIT 1)
        RETURNING s.*;
END
$$;

-- As in 0023, and: each signal that wakes its item is taken by its wait's position.
CREATE OR REPLACE FUNCTION animus.signal_many(p_ids uuid[], p_events text[], p_payloads jsonb[])
RETURNS TABLE (signal_id bigint, woke bool, error text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_n int := coalesce(cardinality(p_ids), 0);
    v_sent int[];        -- positions (1-based) of the signals sent, in order
    v_wakes int[];       -- positions of those that wake their item
    v_ids bigint[];      -- the ids of the signals sent, in the order of v_sent
    v_actor text := animus.actor();
    v_woken uuid[];      -- the items woken, with their queue, type, priority and message
    v_queues text[];
    v_types text[];
    v_priorities int[];
    v_msgs bigint[];
    q record;
    v_gone jsonb[];
BEGIN
    IF coalesce(cardinality(p_events), 0) <> v_n OR coalesce(cardinality(p_payloads), 0) <> v_n
    THEN
        RAISE EXCEPTION 'signal_many takes as many events and payloads as work ids: got % ids, '
                        '% events and % payloads', v_n, coalesce(cardinality(p_events), 0),
                        coalesce(cardinality(p_payloads), 0)
            USING ERRCODE = '22023';
    END IF;
    IF v_n = 0 THEN
        RETURN;
    END IF;
    PERFORM 1 FROM animus.work_items w WHERE w.id = ANY (p_ids) ORDER BY w.id FOR UPDATE;

    -- What each signal does, as if sent one after the other: an item waiting for an event
    -- is woken by the first signal of that event in the batch; later ones find it queued.
    SELECT array_agg(b.ord ORDER BY b.ord) FILTER (WHERE b.sent),
           array_agg(b.ord ORDER BY b.ord) FILTER (WHERE b.ord = b.waker)
      INTO v_sent, v_wakes
      FROM (SELECT s.ord,
                   w.state IS NOT NULL
                   AND w.state NOT IN ('completed', 'dead', 'merged', 'cancelled') AS sent,
                   CASE WHEN w.state = 'waiting' AND w.wait->>'kind' = 'event' THEN
                        min(s.ord) FILTER (WHERE s.event = w.wait->>'event')
                            OVER (PARTITION BY s.id) END AS waker
              FROM unnest(p_ids, p_events) WITH ORDINALITY AS s(id, event, ord)
              LEFT JOIN animus.work_items w ON w.id = s.id) b;

    -- The signals, in the batch's order (so the first of an item's signals is taken first)
    WITH ins AS (
        INSERT INTO animus.signals (work_id, event, payload, consumed_by_position,
                                    consumed_at)
        SELECT p_ids[s.o], p_events[s.o], p_payloads[s.o],
               CASE WHEN k.ord IS NOT NULL THEN (w.wait->>'position')::int END,
               CASE WHEN k.ord IS NOT NULL THEN now() END
          FROM unnest(v_sent) AS s(o)
          LEFT JOIN unnest(v_wakes) AS k(ord) ON k.ord = s.o
          LEFT JOIN animus.work_items w ON k.ord IS NOT NULL AND w.id = p_ids[s.o]
         ORDER BY s.o
        RETURNING id)
    SELECT array_agg(id ORDER BY id) INTO v_ids FROM ins;

    -- Audited as animus.signal audits them, each with the state its item has when it
    -- arrives: the signals up to (and including) the one that wakes their item first, then
    -- the `woken` rows (the trigger writes them), then the signals that arrive after.
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT w.id, 'signal', w.state, w.state,
           JSON_OBJECT('source': w.source, 'actor': v_actor ABSENT ON NULL RETURNING jsonb),
           jsonb_build_object('signal', x.signal_id, 'event', p_events[x.ord],
                              'sent_by', session_user)
      FROM unnest(v_sent, v_ids) AS x(ord, signal_id)
      JOIN animus.work_items w ON w.id = p_ids[x.ord]
     WHERE NOT EXISTS (SELECT 1 FROM unnest(v_wakes) AS k(ord)
                        WHERE p_ids[k.ord] = w.id AND k.ord < x.ord)
     ORDER BY x.ord;

    IF v_wakes IS NOT NULL THEN
        WITH woken AS (
            UPDATE animus.work_items w
               SET state = 'queued', updated_at = now(),
                   reason = format('woken: signal %s arrived', quote_literal(p_events[k.ord]))
              FROM unnest(v_wakes) AS k(ord)
             WHERE w.id = p_ids[k.ord]
            RETURNING w.id, w.queue, w.work_type, w.priority, w.msg_id)
        SELECT array_agg(id), array_agg(queue), array_agg(work_type), array_agg(priority),
               array_agg(msg_id)
          INTO v_woken, v_queues, v_types, v_priorities, v_msgs
          FROM woken;
        FOR q IN
            SELECT x.queue, array_agg(x.id) AS ids, array_agg(x.t) AS types,
                   array_agg(x.p) AS priorities, array_agg(x.msg) AS msgs
              FROM unnest(v_woken, v_queues, v_types, v_priorities, v_msgs)
                   AS x(id, queue, t, p, msg)
             GROUP BY x.queue
        LOOP
            -- As animus.wake_message, per queue: a message nobody holds is made visible now;
            -- one a claim holds (the item's timer ran out this very moment) is left to that
            -- claim, which delivers the item itself; an item whose message is gone gets a
            -- new one.
            EXECUTE format($f$
                WITH free AS (
                    SELECT m.msg_id FROM pgmq.%1$I m WHERE m.msg_id = ANY ($1)
                       FOR UPDATE SKIP LOCKED)
                UPDATE pgmq.%1$I m SET vt = clock_timestamp()
                  FROM free WHERE m.msg_id = free.msg_id
            $f$, 'q_' || q.queue) USING q.msgs;
            EXECUTE format($f$
                SELECT array_agg(jsonb_build_object('id', x.id, 't', x.t, 'p', x.p))
                  FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[]) AS x(id, t, p, msg)
                 WHERE x.msg IS NULL
                    OR NOT EXISTS (SELECT 1 FROM pgmq.%1$I m WHERE m.msg_id = x.msg)
            $f$, 'q_' || q.queue) INTO v_gone USING q.ids, q.types, q.priorities, q.msgs;
            IF v_gone IS NOT NULL THEN
                PERFORM pgmq.send_batch(q.queue, v_gone, clock_timestamp());
            END IF;
            PERFORM pg_notify('animus_work', json_build_object(
                        'queue', q.queue, 'work_types', json_build_array(t.work_type))::text)
               FROM (SELECT DISTINCT unnest(q.types) AS work_type ORDER BY 1) t;
        END LOOP;

        INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance,
                                      payload)
        SELECT w.id, 'signal', w.state, w.state,
               JSON_OBJECT('source': w.source, 'actor': v_actor ABSENT ON NULL RETURNING jsonb),
               jsonb_build_object('signal', x.signal_id, 'event', p_events[x.ord],
                                  'sent_by', session_user)
          FROM unnest(v_sent, v_ids) AS x(ord, signal_id)
          JOIN animus.work_items w ON w.id = p_ids[x.ord]
         WHERE EXISTS (SELECT 1 FROM unnest(v_wakes) AS k(ord)
                        WHERE p_ids[k.ord] = w.id AND k.ord < x.ord)
         ORDER BY x.ord;
    END IF;

    RETURN QUERY
        SELECT x.signal_id, x.signal_id IS NOT NULL AND b.ord = ANY (coalesce(v_wakes, '{}')),
               CASE WHEN x.signal_id IS NOT NULL THEN NULL
                    WHEN w.id IS NULL THEN format('no work item with id %s', b.id)
                    ELSE format('work item %s is %s: a finished item takes no signals',
                                b.id, w.state) END
          FROM unnest(p_ids) WITH ORDINALITY AS b(id, ord)
          LEFT JOIN unnest(v_sent, v_ids) AS x(ord, signal_id) ON x.ord = b.ord
          LEFT JOIN animus.work_items w ON w.id = b.id
         ORDER BY b.ord;
END
$$;


-- Steps of running attempts, recorded together: entry i is step p_positions[i] (named
-- p_names[i], its result and the result's hash) of the attempt holding the lease
-- (p_ids[i], p_msg_ids[i], p_leases[i]), with its audit row, as animus.record_step records
-- one. An entry whose lease is not held, whose item is not running or whose position is
-- recorded already fails the whole call with record_step's own error, and records nothing.
-- Items are locked in id order, as every batch locks them.
CREATE FUNCTION animus.record_steps(p_ids uuid[], p_msg_ids bigint[], p_leases int[],
                                    p_positions int[], p_names text[], p_results jsonb[],
                                    p_hashes text[], p_started_at timestamptz[],
                                    p_durations bigint[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_bad record;
    v_actor text := animus.actor();
BEGIN
    PERFORM 1 FROM animus.work_items w WHERE w.id = ANY (p_ids) ORDER BY w.id FOR UPDATE;
    SELECT x.* INTO v_bad
      FROM unnest(p_ids, p_msg_ids, p_leases, p_positions, p_names, p_results, p_hashes,
                  p_started_at, p_durations)
           WITH ORDINALITY AS x(id, msg_id, lease, pos, name, result, hash, started_at,
                                duration_ms, ord)
      LEFT JOIN animus.work_items w ON w.id = x.id
     WHERE w.id IS NULL OR w.state <> 'running'
        OR (w.msg_id, w.lease) IS DISTINCT FROM (x.msg_id, x.lease)
        OR EXISTS (SELECT 1 FROM animus.steps s WHERE s.work_id = x.id AND s.position = x.pos)
     ORDER BY x.ord LIMIT 1;
    IF FOUND THEN  -- raises what record_step raises for it
        PERFORM animus.record_step(v_bad.id, v_bad.msg_id, v_bad.lease, v_bad.pos,
                                   v_bad.name, v_bad.result, v_bad.hash, v_bad.started_at,
                                   v_bad.duration_ms);
    END IF;
    INSERT INTO animus.steps (work_id, position, name, attempt, result, result_hash,
                              started_at, duration_ms)
    SELECT x.id, x.pos, x.name, w.attempts, x.result, x.hash, x.started_at, x.duration_ms
      FROM unnest(p_ids, p_positions, p_names, p_results, p_hashes, p_started_at,
                  p_durations) WITH ORDINALITY
           AS x(id, pos, name, result, hash, started_at, duration_ms, ord)
      JOIN animus.work_items w ON w.id = x.id
     ORDER BY x.ord;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT x.id, 'step', w.state, w.state,
           JSON_OBJECT('source': w.source, 'actor': v_actor ABSENT ON NULL RETURNING jsonb),
           jsonb_build_object('position', x.pos, 'name', x.name, 'attempt', w.attempts,
                              'result_hash', x.hash, 'duration_ms', x.duration_ms)
      FROM unnest(p_ids, p_positions, p_names, p_hashes, p_durations) WITH ORDINALITY
           AS x(id, pos, name, hash, duration_ms, ord)
      JOIN animus.work_items w ON w.id = x.id
     ORDER BY x.ord;
END
$$;

REVOKE EXECUTE ON FUNCTION
    animus.record_steps(uuid[], bigint[], int[], int[], text[], jsonb[], text[],
                        timestamptz[], bigint[])
  FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_operator') THEN
        GRANT EXECUTE ON FUNCTION
            animus.record_steps(uuid[], bigint[], int[], int[], text[], jsonb[], text[],
                                timestamptz[], bigint[])
          TO animus_operator;
    END IF;
END
$$;
