-- Lost attempts, and leases that are known to be lost.
--
-- Execution records promise one row per attempt. An attempt whose engine died (or stalled
-- past its lease) wrote none: the next claim took its item back (running -> failed ->
-- queued or dead) and nobody recorded the attempt. That claim now appends the attempt's
-- record, result 'lost', in the same transaction. The engine that ran the attempt may be
-- gone, so the record holds what the database knows (the item, the attempt, when it went
-- running, why it was lost) and null for what only that engine knew: the params hash, the
-- faculty, the engine version, the environment.
--
-- A record is appended only when the attempt has none yet (an engine may have recorded its
-- failure before the item was taken back).
--
-- extend_leases() extends only the leases still held (the message's read count is the
-- lease token) and names the items whose lease is lost, so that an engine can stop the
-- focus, and kill its hooks, at once instead of running on beside the next attempt.

ALTER TABLE animus.execution_records
    DROP CONSTRAINT execution_records_result_check,
    ALTER COLUMN params_hash DROP NOT NULL,
    ALTER COLUMN faculty DROP NOT NULL,
    ALTER COLUMN faculty_hash DROP NOT NULL,
    ALTER COLUMN engine_version DROP NOT NULL,
    ALTER COLUMN environment_hash DROP NOT NULL,
    ADD CONSTRAINT execution_records_result_check
        CHECK (result IN ('completed', 'failed', 'lost')),
    ADD CONSTRAINT execution_records_known_inputs
        CHECK (result = 'lost'
               OR (params_hash IS NOT NULL AND faculty IS NOT NULL AND faculty_hash IS NOT NULL
                   AND engine_version IS NOT NULL AND environment_hash IS NOT NULL));

-- As in 0010, but the attempts taken back while running are recorded as lost.
CREATE OR REPLACE FUNCTION animus.claim(p_queue text, p_qty int, p_vt_seconds int,
                                        p_work_types text[], p_start bool)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql AS $$
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

    -- Messages left over: their item's lease expired (claimed or running), it failed and
    -- waits for a retry, it finished, or it is missing. Items claimed just above are not
    -- among them (whichever of their messages they were claimed through).
    SELECT array_agg(c.id) INTO v_stale
      FROM unnest(v_ids) AS c(id)
      LEFT JOIN animus.work_items w ON w.id = c.id
     WHERE w.id IS NULL
        OR NOT EXISTS (SELECT 1 FROM unnest(v_msgs, v_reads) AS m(msg_id, read_ct)
                        WHERE m.msg_id = w.msg_id AND m.read_ct = w.lease);

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
       SET state = CASE WHEN w.attempts < w.max_attempts THEN 'queued'
                        ELSE 'dead' END::animus.work_state,
           reason = CASE WHEN w.attempts < w.max_attempts
                         THEN 'retry after: ' || coalesce(w.outcome_error, 'failure')
                         ELSE 'attempts exhausted (' || w.attempts || '/' || w.max_attempts
                              || '): ' || coalesce(w.outcome_error, 'failure') END,
           resolved_at = CASE WHEN w.attempts < w.max_attempts THEN NULL ELSE now() END,
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

-- Extend the leases still held, by message and lease token; return the items whose lease
-- is lost: claimed again since (another lease token), gone, or whose attempt was recorded
-- lost (taken back and dead-lettered, with no new claim).
CREATE FUNCTION animus.extend_leases(p_queue text, p_ids uuid[], p_msg_ids bigint[],
                                     p_leases int[], p_seconds int)
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format($q$
        UPDATE pgmq.%I m SET vt = clock_timestamp() + make_interval(secs => $3)
          FROM unnest($1::bigint[], $2::int[]) AS x(msg_id, lease)
         WHERE m.msg_id = x.msg_id AND m.read_ct = x.lease
    $q$, 'q_' || p_queue) USING p_msg_ids, p_leases, p_seconds;
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
