-- The hot path of work: claim, complete, seal and execution records.
--
-- A claim that starts its focus at once moves queued -> running in one UPDATE, and the audit
-- trigger records it as the two legal steps it is (queued -> claimed, claimed -> running),
-- each with its own audit row. Only a claim may do this: the row must take a new lease
-- (message and read count) in the same UPDATE; otherwise queued -> running is refused like
-- any illegal transition.
--
-- The trigger also checks legality in the same pass that writes the audit rows (a row whose
-- step is not in animus.transitions raises before anything is kept), so each UPDATE joins its
-- transition tables once instead of twice.

CREATE FUNCTION animus.refuse_transition(p_id uuid, p_from animus.work_state,
                                         p_to animus.work_state) RETURNS bool
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'illegal transition for work item %: % -> %', p_id, p_from, p_to
        USING ERRCODE = 'ANI01',
              HINT = 'legal transitions are listed in animus.transitions';
END
$$;

CREATE OR REPLACE FUNCTION animus.work_items_updated() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH a AS (
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id, s.to_state::text, s.from_state, s.to_state,
           jsonb_strip_nulls(jsonb_build_object(
               'source', n.source, 'trigger', n.trigger, 'actor', animus.actor())),
           jsonb_strip_nulls(jsonb_build_object(
               'reason', n.reason, 'attempts', s.attempts,
               'error', CASE WHEN n.state IN ('failed', 'dead') THEN n.outcome_error END,
               'outcome', CASE WHEN n.state = 'completed' THEN n.outcome_data END,
               'duration_ms', CASE WHEN n.state IN ('completed', 'failed') THEN n.duration_ms END))
      FROM new_rows n JOIN old_rows o USING (id)
     CROSS JOIN LATERAL (
         SELECT o.state = 'queued' AND n.state = 'running'
                AND (n.msg_id, n.lease) IS DISTINCT FROM (o.msg_id, o.lease) AS claim_and_start) c
     CROSS JOIN LATERAL (
         SELECT 1 AS step, o.state AS from_state,
                CASE WHEN c.claim_and_start THEN 'claimed' ELSE n.state END
                    ::animus.work_state AS to_state,
                CASE WHEN c.claim_and_start THEN o.attempts ELSE n.attempts END AS attempts
         UNION ALL
         SELECT 2, 'claimed', n.state, n.attempts WHERE c.claim_and_start) s
      LEFT JOIN animus.transitions t
        ON t.from_state = s.from_state AND t.to_state = s.to_state
     WHERE o.state IS DISTINCT FROM n.state
       AND (t.from_state IS NOT NULL
            OR animus.refuse_transition(n.id, s.from_state, s.to_state))
     ORDER BY n.id, s.step
    RETURNING id)
    INSERT INTO animus.audit_unsealed SELECT id FROM a;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION animus.claim(p_queue text, p_qty int, p_vt_seconds int,
                                        p_work_types text[], p_start bool)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
    v_msgs bigint[];
    v_reads int[];
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

    -- The bookkeeping below is needed only when a message's item is not plainly queued
    -- (an expired lease, a finished item, a missing item): one indexed probe finds out.
    IF EXISTS (SELECT 1 FROM unnest(v_ids) AS u(id)
                 LEFT JOIN animus.work_items w ON w.id = u.id
                WHERE w.id IS NULL OR w.state <> 'queued') THEN
        UPDATE animus.work_items w
           SET state = 'queued', reason = 'lease expired before the focus started',
               updated_at = now()
         WHERE w.id = ANY (v_ids) AND w.state = 'claimed';
        UPDATE animus.work_items w
           SET state = 'failed', outcome_error = 'lease expired while running (engine lost)',
               reason = 'lease expired while running (engine lost)', updated_at = now()
         WHERE w.id = ANY (v_ids) AND w.state = 'running';
        UPDATE animus.work_items w
           SET state = CASE WHEN w.attempts < w.max_attempts THEN 'queued'
                            ELSE 'dead' END::animus.work_state,
               reason = CASE WHEN w.attempts < w.max_attempts
                             THEN 'retry after: ' || coalesce(w.outcome_error, 'failure')
                             ELSE 'attempts exhausted (' || w.attempts || '/' || w.max_attempts
                                  || '): ' || coalesce(w.outcome_error, 'failure') END,
               resolved_at = CASE WHEN w.attempts < w.max_attempts THEN NULL ELSE now() END,
               updated_at = now()
         WHERE w.id = ANY (v_ids) AND w.state = 'failed';
        PERFORM pgmq.archive(p_queue, array_agg(c.msg_id))
           FROM unnest(v_ids, v_msgs) AS c(id, msg_id)
           LEFT JOIN animus.work_items w ON w.id = c.id
          WHERE w.id IS NULL OR w.state <> 'queued'
         HAVING count(*) > 0;
    END IF;

    -- queued -> claimed, or with p_start queued -> (claimed ->) running in the same UPDATE,
    -- which also returns what was claimed (the bookkeeping left only queued items here)
    RETURN QUERY
        WITH claimed AS (
            UPDATE animus.work_items w
               SET state = CASE WHEN p_start THEN 'running' ELSE 'claimed' END
                           ::animus.work_state,
                   attempts = w.attempts + CASE WHEN p_start THEN 1 ELSE 0 END,
                   msg_id = c.msg_id, lease = c.read_ct, reason = NULL, updated_at = now()
              FROM unnest(v_ids, v_msgs, v_reads) AS c(id, msg_id, read_ct)
             WHERE w.id = c.id AND w.id = ANY (v_ids) AND w.state = 'queued'
            RETURNING w.*)
        SELECT * FROM claimed ORDER BY priority DESC, msg_id;
END
$$;

-- Foreign keys into append-only tables guard nothing (their rows are never deleted, and
-- `animus audit verify` names a seal whose row is missing), yet each check locks the row it
-- points at (FOR KEY SHARE), which writes to that row's page: once per sealed audit row and
-- once per execution record, all on the same environments row.
ALTER TABLE animus.audit_seal DROP CONSTRAINT audit_seal_audit_id_fkey;
ALTER TABLE animus.execution_records DROP CONSTRAINT execution_records_environment_hash_fkey;
