-- A claim that takes back the items of expired leases, and one that writes its faculties'
-- attempt limits into the items it claimed, reach those items by id, whatever the statistics
-- of work_items said when their plans were made (as 0048 to 0050 do for the other batches).
--
-- Planned while work_items held a row, the claim's look at the messages left over (their
-- lease expired, their item waits for a timer, or it finished) read the table's whole
-- primary key: 3,054 entries to take back 4 expired leases over a table of 3,000.

-- As in 0043, but for how it finds the items left over.
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
    EXECUTE format('SELECT * FROM animus.%I($1, $2, $3, $4)', 'q_' || p_queue || '_claim')
       INTO v_msgs, v_reads, v_ids USING p_qty, p_work_types, p_vt_seconds, clock_timestamp();
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- the usual case: every message's item is plainly queued
    PERFORM animus.audit_by_statement(cardinality(v_ids));
    RETURN QUERY SELECT * FROM animus.take_queued(v_ids, v_msgs, v_reads, NULL, p_start);
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
      LEFT JOIN LATERAL (SELECT w.id, w.msg_id, w.lease FROM animus.work_items w
                          WHERE w.id = c.id OFFSET 0) AS w ON true
     WHERE w.id IS NULL
        OR NOT EXISTS (SELECT 1 FROM unnest(v_msgs, v_reads) AS m(msg_id, read_ct)
                        WHERE m.msg_id = w.msg_id AND m.read_ct = w.lease);

    UPDATE animus.work_items w
       SET state = 'queued', updated_at = now(), reason = animus.timer_woke(w.wait)
     WHERE w.id = ANY (v_stale) AND w.state::text = 'waiting';
    UPDATE animus.work_items w
       SET state = 'queued', reason = 'lease expired before the focus started',
           updated_at = now()
     WHERE w.id = ANY (v_stale) AND w.state::text = 'claimed';
    WITH lost AS (
        UPDATE animus.work_items w
           SET state = 'failed', outcome_error = 'lease expired while running (engine lost)',
               reason = 'lease expired while running (engine lost)', updated_at = now()
         WHERE w.id = ANY (v_stale) AND w.state::text = 'running'
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
     WHERE w.id = ANY (v_stale) AND w.state::text = 'failed';
    -- a message whose item is still not queued has nothing left to deliver
    PERFORM animus.archive_messages(p_queue, array_agg(c.msg_id))
       FROM unnest(v_ids, v_msgs) AS c(id, msg_id)
       LEFT JOIN LATERAL (SELECT w.id, w.state FROM animus.work_items w
                           WHERE w.id = c.id OFFSET 0) AS w ON true
      WHERE c.id = ANY (v_stale) AND (w.id IS NULL OR w.state <> 'queued')
     HAVING count(*) > 0;

    -- the items the bookkeeping put back in the queue are claimed through these messages
    RETURN QUERY SELECT * FROM animus.take_queued(v_ids, v_msgs, v_reads, v_stale, p_start);
END
$$;

-- As in 0027, but for how it finds its items.
CREATE OR REPLACE FUNCTION animus.claim(p_queue text, p_qty int, p_vt_seconds int, p_work_types text[],
                             p_start bool, p_max_attempts jsonb)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_claimed animus.work_items[];
BEGIN
    SELECT array_agg(c) INTO v_claimed
      FROM animus.claim(p_queue, p_qty, p_vt_seconds, p_work_types, p_start) AS c;
    IF v_claimed IS NULL THEN
        RETURN;
    END IF;
    IF p_max_attempts IS NULL OR p_max_attempts = '{}' THEN
        RETURN QUERY SELECT * FROM unnest(v_claimed);
        RETURN;
    END IF;
    RETURN QUERY
        WITH fixed AS (
            UPDATE animus.work_items w
               SET max_attempts = (p_max_attempts->>w.work_type)::int
              FROM unnest(v_claimed) AS c
                   CROSS JOIN LATERAL (SELECT i.ctid FROM animus.work_items i
                                        WHERE i.id = c.id OFFSET 0) AS found
             WHERE w.ctid = found.ctid AND p_max_attempts ? w.work_type
               AND w.max_attempts IS DISTINCT FROM (p_max_attempts->>w.work_type)::int
            RETURNING w.*)
        SELECT f.* FROM fixed f
        UNION ALL
        SELECT c.* FROM unnest(v_claimed) AS c
         WHERE NOT EXISTS (SELECT 1 FROM fixed f WHERE f.id = c.id);
END
$$;

-- replaced above: their settings (0040, 0042, 0043) again
ALTER FUNCTION animus.claim(text, int, int, text[], bool) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION animus.claim(text, int, int, text[], bool) SET enable_seqscan = off;
ALTER FUNCTION animus.claim(text, int, int, text[], bool, jsonb)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION animus.claim(text, int, int, text[], bool, jsonb) SET enable_seqscan = off;
