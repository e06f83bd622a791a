-- A claim and a completion of many items take time in proportion to their items again.
--
-- The plans 0040 keeps per session hold their arrays as parameters, and Postgres searches a
-- parameter's array from one end to the other for each row it filters (a constant array it
-- would hash). A claim's update of its items filtered each by "id = ANY (p_only)", and a
-- completion's by "id = ANY (p_ids)" (the items it joins from the same array): with 256
-- items a call, 65,536 comparisons each, and Postgres spent 538 us of CPU per drained item
-- instead of 205. The completion no longer repeats the filter; a claim passes NULL, "all of
-- them", in the usual case, and the list of the items left over only when there are any
-- (a few). signal_many and record_steps plan for their arrays again, as before 0040 (they
-- filter by arrays the same way, and were not measured the better for a kept plan).

CREATE OR REPLACE FUNCTION animus.take_queued(p_ids uuid[], p_msgs bigint[], p_reads int[],
                                              p_only uuid[], p_start bool)
RETURNS SETOF animus.work_items
LANGUAGE sql AS $$
    WITH claimed AS (
        UPDATE animus.work_items w
           SET state = CASE WHEN p_start THEN 'running' ELSE 'claimed' END::animus.work_state,
               attempts = w.attempts + CASE WHEN p_start THEN 1 ELSE 0 END,
               msg_id = c.msg_id, lease = c.read_ct, reason = NULL, updated_at = now()
          FROM unnest(p_ids, p_msgs, p_reads) AS c(id, msg_id, read_ct)
         WHERE w.id = c.id AND w.state::text = 'queued'
           AND (p_only IS NULL OR c.id = ANY (p_only))
        RETURNING w.*)
    SELECT * FROM claimed ORDER BY priority DESC, msg_id
$$;

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
      LEFT JOIN animus.work_items w ON w.id = c.id
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
       LEFT JOIN animus.work_items w ON w.id = c.id
      WHERE c.id = ANY (v_stale) AND (w.id IS NULL OR w.state <> 'queued')
     HAVING count(*) > 0;

    -- the items the bookkeeping put back in the queue are claimed through these messages
    RETURN QUERY SELECT * FROM animus.take_queued(v_ids, v_msgs, v_reads, v_stale, p_start);
END
$$;

CREATE OR REPLACE FUNCTION animus.complete(p_ids uuid[], p_msg_ids bigint[], p_leases int[],
                                           p_data jsonb[], p_duration_ms bigint[])
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_done uuid[];
    v_queues text[];
    v_msgs bigint[];
    bad record;
BEGIN
    PERFORM 1 FROM animus.work_items w WHERE w.id = ANY (p_ids) ORDER BY w.id FOR UPDATE;
    PERFORM animus.audit_by_statement(cardinality(p_ids));
    WITH x AS (
        SELECT * FROM unnest(p_ids, p_msg_ids, p_leases, p_data, p_duration_ms)
                 AS x(id, msg_id, lease, data, duration_ms)
    ), upd AS (
        UPDATE animus.work_items w
           SET state = 'completed', outcome_data = x.data, outcome_error = NULL,
               duration_ms = x.duration_ms, reason = 'completed', resolved_at = now(),
               updated_at = now()
          FROM x
         WHERE w.id = x.id AND w.msg_id = x.msg_id AND w.lease = x.lease
           AND w.state::text = 'running'
        RETURNING w.id, w.queue, w.msg_id
    )
    SELECT array_agg(upd.id), array_agg(upd.queue), array_agg(upd.msg_id)
      INTO v_done, v_queues, v_msgs FROM upd;
    PERFORM animus.audit_by_statement(0);

    PERFORM animus.archive_messages(t.queue, array_agg(t.msg_id))
       FROM unnest(v_queues, v_msgs) AS t(queue, msg_id) GROUP BY t.queue;

    IF coalesce(array_length(v_done, 1), 0) <> coalesce(array_length(p_ids, 1), 0) THEN
        SELECT x.id, w.state,
               (w.msg_id, w.lease) IS NOT DISTINCT FROM (x.msg_id, x.lease) AS same_lease
          INTO bad
          FROM unnest(p_ids, p_msg_ids, p_leases) AS x(id, msg_id, lease)
          LEFT JOIN animus.work_items w ON w.id = x.id
         WHERE v_done IS NULL OR NOT x.id = ANY (v_done)
         LIMIT 1;
        IF bad.state IS NULL THEN
            RAISE EXCEPTION 'work item % does not exist', bad.id USING ERRCODE = 'ANI04';
        ELSIF NOT bad.same_lease THEN  -- whatever became of the item since
            RAISE EXCEPTION 'lease lost on work item %: it was claimed again after the lease expired', bad.id
                USING ERRCODE = 'ANI02';
        ELSE
            RAISE EXCEPTION 'illegal transition for work item %: % -> completed', bad.id, bad.state
                USING ERRCODE = 'ANI01';
        END IF;
    END IF;
    RETURN QUERY SELECT unnest(v_done);
END
$$;

ALTER FUNCTION animus.record_steps(uuid[], bigint[], int[], int[], text[], jsonb[], text[],
                                   timestamptz[], bigint[])
    RESET plan_cache_mode;
ALTER FUNCTION animus.signal_many(uuid[], text[], jsonb[]) RESET plan_cache_mode;

-- replaced above: their settings (0040, 0042) again
ALTER FUNCTION animus.take_queued(uuid[], bigint[], int[], uuid[], bool)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION animus.take_queued(uuid[], bigint[], int[], uuid[], bool) SET enable_seqscan = off;
ALTER FUNCTION animus.claim(text, int, int, text[], bool) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION animus.claim(text, int, int, text[], bool) SET enable_seqscan = off;
ALTER FUNCTION animus.complete(uuid[], bigint[], int[], jsonb[], bigint[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION animus.complete(uuid[], bigint[], int[], jsonb[], bigint[])
    SET enable_seqscan = off;
