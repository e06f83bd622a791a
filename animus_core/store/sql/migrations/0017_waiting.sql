-- Suspension: a focus that sleeps or waits for a signal ends its attempt (running ->
-- waiting) and holds no slot and no lease while it waits. Its queue message stays, invisible
-- until the timer (wake_at) or for good when there is none; the claim that finds it visible
-- again wakes it (waiting -> queued) and claims it in the same call, and a signal it waits
-- for wakes it at once. No polling: engines learn of a timer from the NOTIFY of suspend().
--
-- The wake-up replays the item's recorded steps; the resumed attempt records the sleep or
-- the wait as a step at its position (wait->position), reading the wait it was suspended
-- for (kept in work_items.wait until the next suspension) and, for a signal, taking it with
-- take_signal(). Suspensions count as activations, not failures: wherever a retry limit
-- compares attempts with max_attempts, attempts - suspensions is compared.

INSERT INTO animus.transitions (from_state, to_state) VALUES
    ('running', 'waiting'), ('waiting', 'queued'), ('waiting', 'cancelled'), ('waiting', 'dead');

-- wait: {"kind": "sleep"|"event", "position": n, "event": name|null, "until": text|null}
ALTER TABLE animus.work_items
    ADD COLUMN wait jsonb,
    ADD COLUMN wake_at timestamptz,
    ADD COLUMN suspensions int NOT NULL DEFAULT 0 CHECK (suspensions >= 0);

-- A suspended attempt keeps its execution record, with result `suspended`.
ALTER TABLE animus.execution_records
    DROP CONSTRAINT execution_records_result_check,
    ADD CONSTRAINT execution_records_result_check
        CHECK (result IN ('completed', 'failed', 'lost', 'suspended'));

-- wake_at is the timer of a waiting item: it goes when the item leaves waiting, however.
CREATE FUNCTION animus.work_items_left_waiting() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.wake_at := NULL;
    RETURN NEW;
END
$$;

CREATE TRIGGER work_items_wake_at BEFORE UPDATE ON animus.work_items
    FOR EACH ROW WHEN (OLD.state = 'waiting' AND NEW.state <> 'waiting')
    EXECUTE FUNCTION animus.work_items_left_waiting();

-- As in 0012, and: running -> waiting is audited as `suspended` (with the wait, its timer
-- and the count of suspensions), waiting -> queued as `woken`; wait, wake_at and
-- suspensions are columns a state move sets.
CREATE OR REPLACE FUNCTION animus.work_items_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_actor text := animus.actor();
BEGIN
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id,
           CASE WHEN s.from_state = 'running' AND s.to_state = 'waiting' THEN 'suspended'
                WHEN s.from_state = 'waiting' AND s.to_state = 'queued' THEN 'woken'
                ELSE s.to_state::text END,
           s.from_state, s.to_state,
           JSON_OBJECT('source': n.source, 'trigger': n.trigger, 'actor': v_actor
                       ABSENT ON NULL RETURNING jsonb),
           JSON_OBJECT('reason': n.reason, 'attempts': s.attempts,
                       'error': CASE WHEN n.state IN ('failed', 'dead') THEN n.outcome_error END,
                       'outcome': CASE WHEN n.state = 'completed' THEN n.outcome_data END,
                       'duration_ms': CASE WHEN n.state IN ('completed', 'failed', 'waiting')
                                           THEN n.duration_ms END,
                       'wait': CASE WHEN n.state = 'waiting' THEN n.wait END,
                       'wake_at': CASE WHEN n.state = 'waiting' THEN n.wake_at END,
                       'suspensions': CASE WHEN n.state = 'waiting' THEN n.suspensions END
                       ABSENT ON NULL RETURNING jsonb)
      FROM (SELECT n.*, o.state AS old_state, o.attempts AS old_attempts,
                   o.state = 'queued' AND n.state = 'running'
                   AND (n.msg_id, n.lease) IS DISTINCT FROM (o.msg_id, o.lease) AS claim_and_start
              FROM new_rows n JOIN old_rows o USING (id)
             WHERE o.state IS DISTINCT FROM n.state) n
     CROSS JOIN (VALUES (1), (2)) AS steps(step)  -- a claim-and-start is two steps
     CROSS JOIN LATERAL (
         SELECT CASE WHEN steps.step = 1 THEN n.old_state ELSE 'claimed' END
                    ::animus.work_state AS from_state,
                CASE WHEN steps.step = 1 AND n.claim_and_start THEN 'claimed' ELSE n.state END
                    ::animus.work_state AS to_state,
                CASE WHEN steps.step = 1 AND n.claim_and_start THEN n.old_attempts
                     ELSE n.attempts END AS attempts) s
      LEFT JOIN animus.transitions t
        ON t.from_state = s.from_state AND t.to_state = s.to_state
     WHERE (steps.step = 1 OR n.claim_and_start)
       AND (t.from_state IS NOT NULL
            OR animus.refuse_transition(n.id, s.from_state, s.to_state))
     ORDER BY n.id, steps.step;

    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id, 'changed', n.state, n.state,
           JSON_OBJECT('source': n.source, 'trigger': n.trigger, 'actor': v_actor
                       ABSENT ON NULL RETURNING jsonb),
           jsonb_build_object('columns', c.columns)
      FROM new_rows n
      JOIN old_rows o
        ON o.id = n.id
       AND (o.state = n.state
            OR (o.work_type, o.dedup_key, o.params, o.source, o.trigger, o.priority, o.queue,
                o.parent_id, o.merged_into, o.replay_of, o.traceparent, o.gate, o.max_attempts,
                o.created_at, o.usage, o.cancel_requested)
               IS DISTINCT FROM
               (n.work_type, n.dedup_key, n.params, n.source, n.trigger, n.priority, n.queue,
                n.parent_id, n.merged_into, n.replay_of, n.traceparent, n.gate, n.max_attempts,
                n.created_at, n.usage, n.cancel_requested))
     CROSS JOIN LATERAL (
         SELECT jsonb_object_agg(nc.key, jsonb_build_object('old', oc.value, 'new', nc.value))
                AS columns
           FROM jsonb_each(to_jsonb(n)) AS nc
           JOIN jsonb_each(to_jsonb(o)) AS oc ON oc.key = nc.key
          WHERE nc.value IS DISTINCT FROM oc.value
            AND nc.key <> ALL (CASE WHEN o.state = n.state THEN ARRAY['updated_at']
                                    ELSE ARRAY['state', 'reason', 'attempts', 'outcome_data',
                                               'outcome_error', 'duration_ms', 'msg_id',
                                               'lease', 'resolved_at', 'updated_at', 'wait',
                                               'wake_at', 'suspensions'] END)) c
     WHERE c.columns IS NOT NULL
       AND NOT (o.state = n.state AND EXISTS (
               SELECT 1 FROM animus.audit_log a
                WHERE a.work_id = n.id AND a.at = now() AND a.db_user = session_user
                  AND CASE a.event
                          WHEN 'approval' THEN c.columns - 'reason' = '{}'
                          WHEN 'cancel_requested' THEN c.columns - 'cancel_requested' = '{}'
                          ELSE false END))
     ORDER BY n.id;
    RETURN NULL;
END
$$;

-- As in 0011, and: a waiting item whose message became visible (its timer ran out) is woken
-- (waiting -> queued) and claimed through that message; the retry limit counts failures
-- (attempts - suspensions), not suspensions.
CREATE OR REPLACE FUNCTION animus.claim(p_queue text, p_qty int, p_vt_seconds int,
                                        p_work_types text[], p_start bool)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_ids uuid[];
    v_msgs bigint[];
    v_reads int[];
    v_claimed int;
    v_stale uuid[];
BEGIN
    EXECUTE format($q$
        WITH cte AS (
            SELECT msg_id FROM pgmq.%1$I
             WHERE vt <= clock_timestamp()
               AND ($2::text[] IS NULL OR message->>'t' = ANY ($2))
             ORDER BY ((message->>'p')::int) DESC, msg_id
             LIMIT $1
             FOR UPDATE SKIP LOCKED
        ), upd AS (
            UPDATE pgmq.%1$I m
               SET last_read_at = clock_timestamp(),
                   vt = clock_timestamp() + make_interval(secs => $3),
                   read_ct = read_ct + 1
              FROM cte WHERE m.msg_id = cte.msg_id
            RETURNING m.msg_id, m.read_ct, (m.message->>'id')::uuid AS id
        )
        SELECT array_agg(msg_id), array_agg(read_ct), array_agg(id) FROM upd
    $q$, 'q_' || p_queue) INTO v_msgs, v_reads, v_ids USING p_qty, p_work_types, p_vt_seconds;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- the usual case: every message's item is plainly queued
    RETURN QUERY SELECT * FROM animus.take_queued(v_ids, v_msgs, v_reads, v_ids, p_start);
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    IF v_claimed = cardinality(v_ids) THEN
        RETURN;
    END IF;

    -- Messages left over: their item's timer ran out (waiting), its lease expired (claimed
    -- or running), it failed and waits for a retry, it finished, or it is missing. Items
    -- claimed just above are not among them (whichever of their messages they were claimed
    -- through).
    SELECT array_agg(c.id) INTO v_stale
      FROM unnest(v_ids) AS c(id)
      LEFT JOIN animus.work_items w ON w.id = c.id
     WHERE w.id IS NULL
        OR NOT EXISTS (SELECT 1 FROM unnest(v_msgs, v_reads) AS m(msg_id, read_ct)
                        WHERE m.msg_id = w.msg_id AND m.read_ct = w.lease);

    UPDATE animus.work_items w
       SET state = 'queued', updated_at = now(),
           reason = CASE WHEN w.wait->>'kind' = 'sleep'
                         THEN format('woken: sleep until %s ended', w.wait->>'until')
                         ELSE format('woken: wait for %s timed out',
                                     quote_literal(coalesce(w.wait->>'event', '?'))) END
     WHERE w.id = ANY (v_stale) AND w.state = 'waiting';
    UPDATE animus.work_items w
       SET state = 'queued', reason = 'lease expired before the focus started',
           updated_at = now()
     WHERE w.id = ANY (v_stale) AND w.state = 'claimed';
    WITH lost AS (
        UPDATE animus.work_items w
           SET state = 'failed', outcome_error = 'lease expired while running (engine lost)',
               reason = 'lease expired while running (engine lost)', updated_at = now()
         WHERE w.id = ANY (v_stale) AND w.state = 'running'
        RETURNING w.id, w.attempts, w.work_type, w.outcome_error)
    INSERT INTO animus.execution_records (work_id, attempt, result, work_type, error,
                                          started_at)
    SELECT l.id, l.attempts, 'lost', l.work_type, l.outcome_error,
           coalesce((SELECT max(a.at) FROM animus.audit_log a
                      WHERE a.work_id = l.id AND a.event = 'running'), now())
      FROM lost l
     WHERE NOT EXISTS (SELECT 1 FROM animus.execution_records r
                        WHERE r.work_id = l.id AND r.attempt = l.attempts);
    UPDATE animus.work_items w
       SET state = CASE WHEN w.attempts - w.suspensions < w.max_attempts THEN 'queued'
                        ELSE 'dead' END::animus.work_state,
           reason = CASE WHEN w.attempts - w.suspensions < w.max_attempts
                         THEN 'retry after: ' || coalesce(w.outcome_error, 'failure')
                         ELSE 'attempts exhausted (' || (w.attempts - w.suspensions) || '/'
                              || w.max_attempts || '): ' || coalesce(w.outcome_error, 'failure')
                         END,
           resolved_at = CASE WHEN w.attempts - w.suspensions < w.max_attempts THEN NULL
                              ELSE now() END,
           updated_at = now()
     WHERE w.id = ANY (v_stale) AND w.state = 'failed';
    -- a message whose item is still not queued has nothing left to deliver
    PERFORM pgmq.archive(p_queue, array_agg(c.msg_id))
       FROM unnest(v_ids, v_msgs) AS c(id, msg_id)
       LEFT JOIN animus.work_items w ON w.id = c.id
      WHERE c.id = ANY (v_stale) AND (w.id IS NULL OR w.state <> 'queued')
     HAVING count(*) > 0;

    -- the items the bookkeeping put back in the queue are claimed through these messages
    RETURN QUERY SELECT * FROM animus.take_queued(v_ids, v_msgs, v_reads, v_stale, p_start);
END
$$;

-- As in 0012, the default reason counting failures, not suspensions.
CREATE OR REPLACE FUNCTION animus.retry(p_id uuid, p_delay float8, p_reason text)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_id);
BEGIN
    PERFORM animus.require_transition(p_id, v_item.state, 'queued');
    IF v_item.state <> 'failed' THEN
        RAISE EXCEPTION 'work item % is %: only failed items retry', p_id, v_item.state
            USING ERRCODE = 'ANI01';
    END IF;
    UPDATE animus.work_items w
       SET state = 'queued', updated_at = now(),
           reason = coalesce(nullif(p_reason, ''),
                             format('retry %s/%s', w.attempts - w.suspensions + 1,
                                    w.max_attempts))
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM animus.requeue_message(v_item, p_delay);
    RETURN NEXT v_item;
END
$$;

-- As in 0012, but a message is extended only while its item holds that lease: an engine
-- extending the lease of an attempt that suspended meanwhile must not move the timer.
CREATE OR REPLACE FUNCTION animus.extend_leases(p_queue text, p_ids uuid[], p_msg_ids bigint[],
                                                p_leases int[], p_seconds int)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    EXECUTE format($q$
        UPDATE pgmq.%I m SET vt = clock_timestamp() + make_interval(secs => $3)
          FROM unnest($1::bigint[], $2::int[], $4::uuid[]) AS x(msg_id, lease, id)
          JOIN animus.work_items w ON w.id = x.id AND w.msg_id = x.msg_id AND w.lease = x.lease
         WHERE m.msg_id = x.msg_id AND m.read_ct = x.lease
    $q$, 'q_' || p_queue) USING p_msg_ids, p_leases, p_seconds, p_ids;
    RETURN QUERY
        SELECT x.id FROM unnest(p_ids, p_msg_ids, p_leases) AS x(id, msg_id, lease)
          LEFT JOIN animus.work_items w ON w.id = x.id
         WHERE w.id IS NULL
            OR (w.msg_id, w.lease) IS DISTINCT FROM (x.msg_id, x.lease)
            OR EXISTS (SELECT 1 FROM animus.execution_records r
                        WHERE r.work_id = x.id AND r.attempt = w.attempts
                          AND r.result = 'lost');
END
$$;

-- running -> waiting: the attempt that holds the lease suspends (a lost lease raises, ANI02,
-- and changes nothing). p_wait is what it waits for, p_wake_at its timer (NULL: none). The
-- attempt's execution record is kept with result `suspended`; the item gives up its lease
-- and its message is hidden until the timer (for good without one); engines are told of the
-- timer on animus_work. Audited as `suspended` by the trigger. A wait for an event whose
-- signal is there already (it arrived while the attempt ran on) is woken in the same call.
CREATE FUNCTION animus.suspend(p_id uuid, p_msg_id bigint, p_lease int, p_wait jsonb,
                               p_wake_at timestamptz, p_duration_ms bigint, p_execution jsonb)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
    v_event text := quote_literal(coalesce(p_wait->>'event', '?'));
BEGIN
    PERFORM animus.require_transition(p_id, v_item.state, 'waiting');
    IF jsonb_typeof(p_wait) IS DISTINCT FROM 'object'
       OR (p_wait->>'kind') IS DISTINCT FROM 'sleep' AND (p_wait->>'kind') IS DISTINCT FROM 'event'
       OR (p_wait->>'kind' = 'sleep' AND p_wake_at IS NULL) THEN
        RAISE EXCEPTION 'work item %: a wait is {"kind": "sleep" (with a wake time) or '
                        '"event", ...}, got %', p_id, coalesce(p_wait::text, 'null')
            USING ERRCODE = 'ANI01';
    END IF;
    UPDATE animus.work_items w
       SET state = 'waiting', wait = p_wait, wake_at = p_wake_at, lease = NULL,
           suspensions = w.suspensions + 1, duration_ms = p_duration_ms, updated_at = now(),
           reason = CASE WHEN p_wait->>'kind' = 'sleep'
                         THEN format('sleeping until %s', p_wait->>'until')
                         WHEN p_wake_at IS NULL THEN format('waiting for %s', v_event)
                         ELSE format('waiting for %s until %s', v_event, p_wait->>'until') END
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM animus.record_execution(p_execution);
    IF p_wait->>'kind' = 'event' AND EXISTS (
           SELECT 1 FROM animus.signals s
            WHERE s.work_id = p_id AND s.event = p_wait->>'event'
              AND s.consumed_by_position IS NULL) THEN
        -- the signal arrived after the attempt last looked for it: woken at once
        UPDATE animus.work_items w
           SET state = 'queued', updated_at = now(),
               reason = format('woken: signal %s had arrived', v_event)
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

-- Make a woken item's message visible now and tell the engines. A claim that holds the
-- message (the timer ran out this very moment) delivers the item itself: it is left alone.
CREATE FUNCTION animus.wake_message(p_item animus.work_items) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_free bigint;
    v_held bool;
BEGIN
    IF p_item.msg_id IS NOT NULL THEN
        EXECUTE format('SELECT msg_id FROM pgmq.%I WHERE msg_id = $1 FOR UPDATE SKIP LOCKED',
                       'q_' || p_item.queue) INTO v_free USING p_item.msg_id;
        IF v_free IS NULL THEN
            EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%I WHERE msg_id = $1)',
                           'q_' || p_item.queue) INTO v_held USING p_item.msg_id;
            IF v_held THEN
                RETURN;
            END IF;
        END IF;
    END IF;
    PERFORM animus.requeue_message(p_item, 0);
    IF v_free IS NOT NULL THEN  -- requeue_message told nobody: it sent no new message
        PERFORM pg_notify('animus_work', json_build_object(
                    'queue', p_item.queue, 'work_types', json_build_array(p_item.work_type))::text);
    END IF;
END
$$;

-- Signals to work items: kept until a wait of the item takes them (the first to arrive is
-- taken first), whether they arrive before the wait or during it. They go with their item.
CREATE TABLE animus.signals (
    id                   bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    work_id              uuid NOT NULL REFERENCES animus.work_items (id) ON DELETE CASCADE,
    event                text NOT NULL CHECK (event <> ''),
    payload              jsonb,
    sent_by              text NOT NULL DEFAULT session_user,
    sent_at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    consumed_by_position int,          -- the wait (step position) that took it
    consumed_at          timestamptz
);

CREATE INDEX signals_work ON animus.signals (work_id, event, id);

-- Send signal p_event (with p_payload) to an item that has not finished: recorded and
-- audited (`signal`, the sender being the session's user); an item waiting for that event is
-- woken (waiting -> queued, audited `woken`). Returns the signal's id and whether it woke the
-- item.
CREATE FUNCTION animus.signal(p_id uuid, p_event text, p_payload jsonb)
RETURNS TABLE (signal_id bigint, woke bool)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_id);
    v_signal bigint;
BEGIN
    IF v_item.state IN ('completed', 'dead', 'merged', 'cancelled') THEN
        RAISE EXCEPTION 'work item % is %: a finished item takes no signals', p_id, v_item.state
            USING ERRCODE = 'ANI01';
    END IF;
    INSERT INTO animus.signals (work_id, event, payload) VALUES (p_id, p_event, p_payload)
    RETURNING id INTO v_signal;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (p_id, 'signal', v_item.state, v_item.state,
            JSON_OBJECT('source': v_item.source, 'actor': animus.actor()
                        ABSENT ON NULL RETURNING jsonb),
            jsonb_build_object('signal', v_signal, 'event', p_event, 'sent_by', session_user));
    IF v_item.state = 'waiting' AND v_item.wait->>'kind' = 'event'
       AND v_item.wait->>'event' = p_event THEN
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

-- For the running attempt that holds the lease: the signal p_event taken by the wait at step
-- p_position, the oldest one not taken yet (marked taken by that position), or, when that
-- position took one already (an attempt that did not live to record its step), that one
-- again. No row: no such signal has arrived.
CREATE FUNCTION animus.take_signal(p_id uuid, p_msg_id bigint, p_lease int, p_event text,
                                   p_position int)
RETURNS SETOF animus.signals
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
    v_signal animus.signals;
BEGIN
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

-- New functions are callable by PUBLIC until revoked: revoke at once, and on a database whose
-- roles are set up already grant them now (animus roles setup does it from now on).
REVOKE EXECUTE ON FUNCTION
    animus.work_items_left_waiting(),
    animus.suspend(uuid, bigint, int, jsonb, timestamptz, bigint, jsonb),
    animus.wake_message(animus.work_items),
    animus.signal(uuid, text, jsonb),
    animus.take_signal(uuid, bigint, int, text, int)
  FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_operator') THEN
        GRANT EXECUTE ON FUNCTION
            animus.suspend(uuid, bigint, int, jsonb, timestamptz, bigint, jsonb),
            animus.take_signal(uuid, bigint, int, text, int)
          TO animus_operator;
        GRANT EXECUTE ON FUNCTION animus.signal(uuid, text, jsonb) TO animus_submitter;
        GRANT SELECT ON animus.signals TO animus_reader;
    END IF;
END
$$;
