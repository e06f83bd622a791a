-- Many signals in one call: animus.signal_many sends each signal of a batch as animus.signal
-- would, one after the other in the batch's order, with set-based statements: one INSERT
-- for the signals, the audit rows, one UPDATE for the items they wake, then the woken items'
-- messages made visible per queue, and one notification per queue and work type. A signal
-- to an item that has finished (or does not exist) is not sent: its row says why, and the
-- rest of the batch goes on. And a lease extension waits for a suspension of the same item
-- to commit (extend_leases, at the end).

-- One row per signal, in the order given: the signal's id and whether it woke its item, or
-- (signal_id NULL) why it was not sent. Items are locked in id order, as every batch locks
-- them, so two batches cannot deadlock on each other.
CREATE FUNCTION animus.signal_many(p_ids uuid[], p_events text[], p_payloads jsonb[])
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
        INSERT INTO animus.signals (work_id, event, payload)
        SELECT p_ids[o], p_events[o], p_payloads[o] FROM unnest(v_sent) AS o ORDER BY o
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

REVOKE EXECUTE ON FUNCTION animus.signal_many(uuid[], text[], jsonb[]) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_submitter') THEN
        GRANT EXECUTE ON FUNCTION animus.signal_many(uuid[], text[], jsonb[])
           TO animus_submitter;
    END IF;
END
$$;

-- As in 0017, and: the items are locked (FOR SHARE, in id order, as every batch locks them)
-- before their messages are extended. An attempt that suspends holds its item while it hides
-- the message until its timer (infinity for a wait with none); an extension that read the
-- item before that committed would otherwise wait for the message, then overwrite the timer
-- with the lease, and the waiting item would wake for nothing once that lease ran out.
CREATE OR REPLACE FUNCTION animus.extend_leases(p_queue text, p_ids uuid[], p_msg_ids bigint[],
                                                p_leases int[], p_seconds int)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM 1 FROM animus.work_items w WHERE w.id = ANY (p_ids) ORDER BY w.id FOR SHARE;
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
