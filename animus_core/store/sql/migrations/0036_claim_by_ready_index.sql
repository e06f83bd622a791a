-- A claim takes the first visible messages of its queue in priority order. It read and
-- sorted every visible message to find them: the planner cannot estimate how many messages
-- the work-type filter on the message JSON keeps (it guesses 0.5%), so with a backlog it chose
-- a sequential scan and a sort, 1-3 ms a claim at a few thousand messages and 14 ms at 12,000,
-- on every claim. Walking the old index on (priority, msg_id) instead stepped over every
-- message claimed and not yet finished, and every waiting item's message, all at its head.
--
-- The queue's index is now on (priority DESC, vt, msg_id): within a priority, the messages
-- visible now come first, in the order they became visible (a claimed message moves past the
-- end: its vt is its lease). The claim compares vt with the time taken once (a parameter,
-- so that it bounds the index scan) and plans with sorting disabled, so it walks the index and
-- stops after the messages it takes, whatever the backlog. Within one priority, messages are
-- taken in the order they became visible, then by msg_id, instead of by msg_id alone.

-- `animus roles setup` makes create_queue a SECURITY DEFINER function: replacing it keeps that.
SELECT set_config('animus.create_queue_was_definer', prosecdef::text, true)
  FROM pg_proc WHERE oid = 'animus.create_queue(text)'::regprocedure;

CREATE OR REPLACE FUNCTION animus.create_queue(p_queue text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass(format('pgmq.%I', 'q_' || p_queue || '_ready')) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pgmq.create(p_queue);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I '
                   '(((message->>''p'')::int) DESC, vt, msg_id)',
                   'q_' || p_queue || '_ready', 'q_' || p_queue);
    EXECUTE format('DROP INDEX IF EXISTS pgmq.%I', 'q_' || p_queue || '_prio');
    EXECUTE format('DROP INDEX IF EXISTS pgmq.%I', 'q_' || p_queue || '_vt_idx');
    EXECUTE format('ALTER TABLE pgmq.%I SET (fillfactor = 50)', 'q_' || p_queue);
END
$$;

DO $$
BEGIN
    IF current_setting('animus.create_queue_was_definer', true) = 'true' THEN
        ALTER FUNCTION animus.create_queue(text) SECURITY DEFINER;
        ALTER FUNCTION animus.create_queue(text) SET search_path = pg_catalog, pg_temp;
    END IF;
END
$$;

SELECT animus.create_queue(queue_name) FROM pgmq.meta
 WHERE to_regclass(format('pgmq.%I', 'q_' || queue_name || '_prio')) IS NOT NULL;

-- As in 0030, walking the queue's index.
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
    v_sort text := current_setting('enable_sort');
BEGIN
    PERFORM set_config('enable_sort', 'off', true);  -- the index gives the order
    EXECUTE format($q$
        WITH cte AS (
            SELECT msg_id FROM pgmq.%1$I
             WHERE vt <= $4
               AND ($2::text[] IS NULL OR message->>'t' = ANY ($2))
             ORDER BY ((message->>'p')::int) DESC, vt, msg_id
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
    $q$, 'q_' || p_queue) INTO v_msgs, v_reads, v_ids USING p_qty, p_work_types, p_vt_seconds,
                                                    clock_timestamp();
    PERFORM set_config('enable_sort', v_sort, true);
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- the usual case: every message's item is plainly queued
    PERFORM animus.audit_by_statement(cardinality(v_ids));
    RETURN QUERY SELECT * FROM animus.take_queued(v_ids, v_msgs, v_reads, v_ids, p_start);
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    PERFORM animus.audit_by_statement(0);
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
       SET state = 'queued', updated_at = now(), reason = animus.timer_woke(w.wait)
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
