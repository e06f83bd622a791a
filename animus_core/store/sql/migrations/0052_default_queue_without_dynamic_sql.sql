-- The default queue's moves call its functions by name, not through dynamic SQL.
--
-- Each claim, completion, retry and wake-up reached the functions of its queue (q_<queue>_*)
-- through EXECUTE format(...), which parses and plans a new statement at every call: about
-- 33 us of a claim of two items (533 -> 500 us of the backend's CPU, five alternating rounds
-- of 300 claims). For the queue every engine uses, 'work', the call is now a statement
-- planned once per session; any other queue still goes through EXECUTE.

-- As in 0051, but for how it reaches the queue's claim.
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
    IF p_queue = 'work' THEN
        SELECT q.msg_ids, q.read_cts, q.ids INTO v_msgs, v_reads, v_ids
          FROM animus.q_work_claim(p_qty, p_work_types, p_vt_seconds, clock_timestamp()) AS q;
    ELSE
        EXECUTE format('SELECT * FROM animus.%I($1, $2, $3, $4)', 'q_' || p_queue || '_claim')
           INTO v_msgs, v_reads, v_ids USING p_qty, p_work_types, p_vt_seconds, clock_timestamp();
    END IF;
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

-- replaced above: its settings (0040, 0042, 0043) again
ALTER FUNCTION animus.claim(text, int, int, text[], bool) SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION animus.claim(text, int, int, text[], bool) SET enable_seqscan = off;

-- As in 0037, the default queue by name.
CREATE OR REPLACE FUNCTION animus.archive_messages(p_queue text, p_msg_ids bigint[])
RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF p_queue = 'work' THEN
        PERFORM animus.q_work_archive(p_msg_ids);
    ELSE
        EXECUTE format('SELECT animus.%I($1)', 'q_' || p_queue || '_archive') USING p_msg_ids;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION animus.queue_send(p_queue text, p_message jsonb, p_at timestamptz)
RETURNS bigint LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_msg bigint;
BEGIN
    IF p_queue = 'work' THEN
        RETURN animus.q_work_send(p_message, p_at);
    END IF;
    EXECUTE format('SELECT animus.%I($1, $2)', 'q_' || p_queue || '_send')
       INTO v_msg USING p_message, p_at;
    RETURN v_msg;
END
$$;

CREATE OR REPLACE FUNCTION animus.queue_set_vt(p_queue text, p_msg_id bigint, p_at timestamptz,
                                               p_skip_locked bool)
RETURNS text LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_moved text;
BEGIN
    IF p_queue = 'work' THEN
        RETURN animus.q_work_set_vt(p_msg_id, p_at, p_skip_locked);
    END IF;
    EXECUTE format('SELECT animus.%I($1, $2, $3)', 'q_' || p_queue || '_set_vt')
       INTO v_moved USING p_msg_id, p_at, p_skip_locked;
    RETURN v_moved;
END
$$;
