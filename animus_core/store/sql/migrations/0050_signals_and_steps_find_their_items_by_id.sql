-- Signals and steps sent in a batch reach their items by id, whatever the statistics of
-- work_items say, and the items a batch of signals wakes are audited by statement.
--
-- As the claim, the completion and the lease extension since 0048 and 0049: statistics
-- taken while work_items held a row or two (until the next analyze after it grew) made
-- these functions' joins of the batch's ids with work_items read the table's whole primary
-- key once or more per call: 61,510 entries to send 4 signals over a table of 15,000, and
-- 20,000 to record 4 steps. Each id now finds its item in a lateral subquery.
--
-- The items woken by a batch of signals were audited by a trigger for each row (29 us
-- each); the statement's trigger writes the same rows for all of them at once, as a claim's
-- and a completion's do.

-- As in 0025, but for how it finds its items and audits the woken.
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
    PERFORM 1 FROM (SELECT k.id FROM unnest(p_ids) AS k(id) ORDER BY k.id) AS k
         CROSS JOIN LATERAL (SELECT 1 FROM animus.work_items w WHERE w.id = k.id
                              OFFSET 0 FOR UPDATE) AS locked;

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
              LEFT JOIN LATERAL (SELECT w.state, w.wait FROM animus.work_items w
                                  WHERE w.id = s.id OFFSET 0) AS w ON true) b;

    -- The signals, in the batch's order (so the first of an item's signals is taken first)
    WITH ins AS (
        INSERT INTO animus.signals (work_id, event, payload, consumed_by_position,
                                    consumed_at)
        SELECT p_ids[s.o], p_events[s.o], p_payloads[s.o],
               CASE WHEN k.ord IS NOT NULL THEN (w.wait->>'position')::int END,
               CASE WHEN k.ord IS NOT NULL THEN now() END
          FROM unnest(v_sent) AS s(o)
          LEFT JOIN unnest(v_wakes) AS k(ord) ON k.ord = s.o
          LEFT JOIN LATERAL (SELECT w.wait FROM animus.work_items w
                              WHERE k.ord IS NOT NULL AND w.id = p_ids[s.o] OFFSET 0) AS w
            ON true
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
      CROSS JOIN LATERAL (SELECT w.id, w.state, w.source FROM animus.work_items w
                           WHERE w.id = p_ids[x.ord] OFFSET 0) AS w
     WHERE NOT EXISTS (SELECT 1 FROM unnest(v_wakes) AS k(ord)
                        WHERE p_ids[k.ord] = w.id AND k.ord < x.ord)
     ORDER BY x.ord;

    IF v_wakes IS NOT NULL THEN
        PERFORM animus.audit_by_statement(cardinality(v_wakes));
        WITH woken AS (
            UPDATE animus.work_items w
               SET state = 'queued', updated_at = now(),
                   reason = format('woken: signal %s arrived', quote_literal(p_events[k.ord]))
              FROM unnest(v_wakes) AS k(ord)
                   CROSS JOIN LATERAL (SELECT i.ctid FROM animus.work_items i
                                        WHERE i.id = p_ids[k.ord] OFFSET 0) AS found
             WHERE w.ctid = found.ctid
            RETURNING w.id, w.queue, w.work_type, w.priority, w.msg_id)
        SELECT array_agg(id), array_agg(queue), array_agg(work_type), array_agg(priority),
               array_agg(msg_id)
          INTO v_woken, v_queues, v_types, v_priorities, v_msgs
          FROM woken;
        PERFORM animus.audit_by_statement(0);
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
          CROSS JOIN LATERAL (SELECT w.id, w.state, w.source FROM animus.work_items w
                               WHERE w.id = p_ids[x.ord] OFFSET 0) AS w
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
          LEFT JOIN LATERAL (SELECT w.id, w.state FROM animus.work_items w
                              WHERE w.id = b.id OFFSET 0) AS w ON true
         ORDER BY b.ord;
END
$$;

-- As in 0025, but for how it finds its items.
CREATE OR REPLACE FUNCTION animus.record_steps(p_ids uuid[], p_msg_ids bigint[], p_leases int[],
                                    p_positions int[], p_names text[], p_results jsonb[],
                                    p_hashes text[], p_started_at timestamptz[],
                                    p_durations bigint[])
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_bad record;
    v_actor text := animus.actor();
BEGIN
    PERFORM 1 FROM (SELECT k.id FROM unnest(p_ids) AS k(id) ORDER BY k.id) AS k
         CROSS JOIN LATERAL (SELECT 1 FROM animus.work_items w WHERE w.id = k.id
                              OFFSET 0 FOR UPDATE) AS locked;
    SELECT x.* INTO v_bad
      FROM unnest(p_ids, p_msg_ids, p_leases, p_positions, p_names, p_results, p_hashes,
                  p_started_at, p_durations)
           WITH ORDINALITY AS x(id, msg_id, lease, pos, name, result, hash, started_at,
                                duration_ms, ord)
      LEFT JOIN LATERAL (SELECT w.id, w.state, w.msg_id, w.lease FROM animus.work_items w
                          WHERE w.id = x.id OFFSET 0) AS w ON true
      LEFT JOIN LATERAL (SELECT true AS recorded FROM animus.steps s
                          WHERE s.work_id = x.id AND s.position = x.pos OFFSET 0) AS s ON true
     WHERE w.id IS NULL OR w.state <> 'running'
        OR (w.msg_id, w.lease) IS DISTINCT FROM (x.msg_id, x.lease)
        OR s.recorded
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
      CROSS JOIN LATERAL (SELECT w.state, w.source, w.attempts FROM animus.work_items w
                           WHERE w.id = x.id OFFSET 0) AS w
     ORDER BY x.ord;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT x.id, 'step', w.state, w.state,
           JSON_OBJECT('source': w.source, 'actor': v_actor ABSENT ON NULL RETURNING jsonb),
           jsonb_build_object('position', x.pos, 'name', x.name, 'attempt', w.attempts,
                              'result_hash', x.hash, 'duration_ms', x.duration_ms)
      FROM unnest(p_ids, p_positions, p_names, p_hashes, p_durations) WITH ORDINALITY
           AS x(id, pos, name, hash, duration_ms, ord)
      CROSS JOIN LATERAL (SELECT w.state, w.source, w.attempts FROM animus.work_items w
                           WHERE w.id = x.id OFFSET 0) AS w
     ORDER BY x.ord;
END
$$;

-- replaced above: their settings (0042, 0043) again
ALTER FUNCTION animus.record_steps(uuid[], bigint[], int[], int[], text[], jsonb[], text[],
                                   timestamptz[], bigint[])
    SET enable_seqscan = off;
ALTER FUNCTION animus.signal_many(uuid[], text[], jsonb[]) SET enable_seqscan = off;
