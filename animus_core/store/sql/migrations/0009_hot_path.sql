-- The hot path of work: claim, submit, audit sealing and execution records.
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
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id, s.to_state::text, s.from_state, s.to_state,
           jsonb_strip_nulls(jsonb_build_object(
               'source', n.source, 'trigger', n.trigger, 'actor', animus.actor())),
           jsonb_strip_nulls(jsonb_build_object(
               'reason', n.reason, 'attempts', s.attempts,
               'error', CASE WHEN n.state IN ('failed', 'dead') THEN n.outcome_error END,
               'outcome', CASE WHEN n.state = 'completed' THEN n.outcome_data END,
               'duration_ms', CASE WHEN n.state IN ('completed', 'failed') THEN n.duration_ms END))
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

-- ---------------------------------------------------------------------------------------
-- Sealing without markers. Writers used to add a row to audit_unsealed beside every audit
-- row, and the sealer deleted it: two writes per row to find what is unsealed. The sealer
-- now reads the log in id order past the highest id it has sealed. An id it skips is a
-- *gap*: a transaction that has not committed yet (its rows are sealed once they appear) or
-- one that rolled back (its ids never appear). Gaps are kept in audit_gaps with the
-- snapshot horizon when first seen; a gap is given up only when every transaction that
-- could have taken its id has ended and an hour has passed.
-- ---------------------------------------------------------------------------------------

CREATE TABLE animus.audit_gaps (
    audit_id bigint PRIMARY KEY,
    seen_at  timestamptz NOT NULL DEFAULT now(),
    horizon  xid8 NOT NULL DEFAULT pg_snapshot_xmax(pg_current_snapshot())
);

-- rows still waiting for a seal below the highest sealed id become gaps; those above it
-- are found by the sealer's scan
INSERT INTO animus.audit_gaps (audit_id)
SELECT u.audit_id FROM animus.audit_unsealed u
 WHERE u.audit_id < (SELECT max(audit_id) FROM animus.audit_seal);

-- The writers of audit rows, without the marker (otherwise unchanged).

CREATE OR REPLACE FUNCTION animus.work_items_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT id, state INTO bad FROM new_rows
     WHERE state NOT IN ('created', 'queued', 'merged', 'awaiting_approval', 'dead') LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'illegal transition for work item %: a new item cannot start in state %',
            bad.id, bad.state
            USING ERRCODE = 'ANI01',
                  HINT = 'new items start as created, then queued, merged, awaiting_approval or dead';
    END IF;

    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id,
           CASE n.state WHEN 'merged' THEN 'merged' ELSE 'submitted' END,
           NULL, n.state,
           jsonb_strip_nulls(jsonb_build_object(
               'source', n.source, 'trigger', n.trigger, 'actor', animus.actor())),
           jsonb_strip_nulls(jsonb_build_object(
               'work_type', n.work_type, 'dedup_key', n.dedup_key, 'params', n.params,
               'priority', n.priority, 'queue', n.queue, 'parent_id', n.parent_id,
               'merged_into', n.merged_into, 'replay_of', n.replay_of,
               'max_attempts', n.max_attempts, 'reason', n.reason))
      FROM new_rows n ORDER BY n.created_at, n.id;

    PERFORM pg_notify('animus_work', json_build_object(
                'queue', q.queue, 'work_types', q.types)::text)
       FROM (SELECT queue, array_agg(DISTINCT work_type ORDER BY work_type) AS types
               FROM new_rows WHERE state = 'queued' GROUP BY queue) q;
    RETURN NULL;
END
$$;


CREATE OR REPLACE FUNCTION animus.decide(p_work_id uuid, p_decision text, p_reason text)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    item animus.work_items;
    v_role text;
    v_quorum int;
    v_approvers text[];
    v_super bool;
BEGIN
    IF p_decision NOT IN ('approve', 'reject') THEN
        RAISE EXCEPTION 'decision must be approve or reject, not %', p_decision
            USING ERRCODE = 'ANI03';
    END IF;
    IF p_reason IS NULL OR btrim(p_reason) = '' THEN
        RAISE EXCEPTION 'a decision needs a reason' USING ERRCODE = 'ANI03';
    END IF;
    SELECT * INTO item FROM animus.work_items WHERE id = p_work_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'work item % does not exist', p_work_id USING ERRCODE = 'ANI04';
    END IF;
    IF item.state <> 'awaiting_approval' THEN
        RAISE EXCEPTION 'work item % is %: only items awaiting approval can be decided',
            p_work_id, item.state USING ERRCODE = 'ANI01';
    END IF;
    IF item.requested_by = session_user THEN
        RAISE EXCEPTION '% requested work item % and cannot % it: another person must',
            session_user, p_work_id, p_decision USING ERRCODE = 'ANI03';
    END IF;
    v_role := 'animus_' || coalesce(item.gate->>'role', 'approver');
    v_quorum := coalesce((item.gate->>'quorum')::int, 1);
    SELECT rolsuper INTO v_super FROM pg_roles WHERE rolname = session_user;
    IF NOT coalesce(v_super, false) THEN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            RAISE EXCEPTION 'role % does not exist: run animus roles setup', v_role
                USING ERRCODE = 'ANI03';
        END IF;
        IF NOT pg_has_role(session_user, v_role, 'MEMBER') THEN
            RAISE EXCEPTION '% may not decide work item %: the rule % requires role %',
                session_user, p_work_id, coalesce(item.gate->>'rule', '?'), v_role
                USING ERRCODE = 'ANI03';
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM animus.approvals WHERE work_id = p_work_id
                                                AND approver = session_user) THEN
        RAISE EXCEPTION '% already decided work item %', session_user, p_work_id
            USING ERRCODE = 'ANI03';
    END IF;

    INSERT INTO animus.approvals (work_id, approver, decision, reason)
    VALUES (p_work_id, session_user, p_decision, p_reason);
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (p_work_id, CASE p_decision WHEN 'approve' THEN 'approval' ELSE 'rejection' END,
            item.state, item.state,
            jsonb_strip_nulls(jsonb_build_object('source', item.source, 'actor', animus.actor())),
            jsonb_build_object('approver', session_user, 'decision', p_decision,
                               'reason', p_reason, 'gate', item.gate));

    IF p_decision = 'reject' THEN
        RETURN QUERY UPDATE animus.work_items
           SET state = 'dead', reason = 'rejected by ' || session_user || ': ' || p_reason,
               resolved_at = now(), updated_at = now()
         WHERE id = p_work_id RETURNING *;
        RETURN;
    END IF;
    SELECT array_agg(approver ORDER BY at) INTO v_approvers FROM animus.approvals
     WHERE work_id = p_work_id AND decision = 'approve';
    IF cardinality(v_approvers) >= v_quorum THEN
        PERFORM pgmq.send(item.queue, jsonb_build_object('id', item.id, 't', item.work_type,
                                                         'p', item.priority));
        PERFORM pg_notify('animus_work', json_build_object(
                    'queue', item.queue, 'work_types', json_build_array(item.work_type))::text);
        RETURN QUERY UPDATE animus.work_items
           SET state = 'queued', updated_at = now(),
               reason = 'approved by ' || array_to_string(v_approvers, ', ')
         WHERE id = p_work_id RETURNING *;
        RETURN;
    END IF;
    RETURN QUERY UPDATE animus.work_items
       SET reason = format('approved by %s of %s needed', cardinality(v_approvers), v_quorum),
           updated_at = now()
     WHERE id = p_work_id RETURNING *;
END
$$;

DROP TABLE animus.audit_unsealed;

-- ---------------------------------------------------------------------------------------
-- Submit without a temporary table: every item goes in one INSERT; only items whose dedup
-- key is live already (left out by ON CONFLICT) are taken one at a time, to merge them or,
-- if the live item finished meanwhile, to insert them after all. Same results, same order.
-- `animus roles setup` makes submit a SECURITY DEFINER function: replacing it keeps that.
-- ---------------------------------------------------------------------------------------

-- The items of a submission as rows, defaults applied, in input order (ord).
CREATE FUNCTION animus.submission_items(p_items jsonb)
RETURNS TABLE (ord bigint, work_type text, dedup_key text, params jsonb, source text,
               trigger text, priority int, parent_id uuid, replay_of uuid, max_attempts int,
               traceparent text, state animus.work_state, reason text, gate jsonb)
LANGUAGE sql STABLE AS $$
    SELECT e.ord, x.work_type, x.dedup_key, coalesce(x.params, '{}'), x.source, x.trigger,
           coalesce(x.priority, 0), x.parent_id, x.replay_of, coalesce(x.max_attempts, 3),
           x.traceparent, coalesce(x.state, 'queued')::animus.work_state,
           coalesce(x.reason, 'submitted'), x.gate
      FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(j, ord),
           jsonb_to_record(e.j) AS x(work_type text, dedup_key text, params jsonb,
                                     source text, trigger text, priority int,
                                     parent_id uuid, replay_of uuid, max_attempts int,
                                     traceparent text, state text, reason text, gate jsonb)
$$;

SELECT set_config('animus.submit_was_definer', prosecdef::text, true)
  FROM pg_proc WHERE oid = 'animus.submit(text, jsonb)'::regprocedure;

CREATE OR REPLACE FUNCTION animus.submit(p_queue text, p_items jsonb)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_id uuid;
    v_canonical uuid;
    v_rows animus.work_items[];
    v_ords bigint[];
    v_missing bigint[];
    v_row animus.work_items;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        RAISE EXCEPTION 'queue "%" does not exist', p_queue
            USING ERRCODE = 'ANI04', HINT = 'create it with Db.create_queue or animus db migrate';
    END IF;
    -- Rules may start an item awaiting approval or dead (denied); nothing else.
    IF EXISTS (SELECT 1 FROM jsonb_array_elements(p_items) AS e(j)
                WHERE coalesce(e.j->>'state', 'queued')
                      NOT IN ('queued', 'awaiting_approval', 'dead')) THEN
        RAISE EXCEPTION 'a submitted item can start queued, awaiting_approval or dead'
            USING ERRCODE = 'ANI01';
    END IF;

    WITH input AS MATERIALIZED (
        SELECT animus.new_id() AS id, x.* FROM animus.submission_items(p_items) AS x
    ), ins AS (
        INSERT INTO animus.work_items AS w
               (id, work_type, dedup_key, params, source, trigger, priority, state, reason,
                queue, parent_id, replay_of, max_attempts, traceparent, gate, resolved_at)
        SELECT i.id, i.work_type, i.dedup_key, i.params, i.source, i.trigger, i.priority,
               i.state, i.reason, p_queue, i.parent_id, i.replay_of, i.max_attempts,
               i.traceparent, i.gate, CASE WHEN i.state = 'dead' THEN now() END
          FROM input i ORDER BY i.ord
        ON CONFLICT (work_type, dedup_key)
           WHERE dedup_key IS NOT NULL
             AND state NOT IN ('completed', 'dead', 'merged', 'cancelled')
        DO NOTHING
        RETURNING w.*
    )
    SELECT array_agg(ROW(ins.*)::animus.work_items ORDER BY i.ord)
               FILTER (WHERE ins.id IS NOT NULL),
           array_agg(i.ord ORDER BY i.ord) FILTER (WHERE ins.id IS NOT NULL),
           array_agg(i.ord ORDER BY i.ord) FILTER (WHERE ins.id IS NULL)
      INTO v_rows, v_ords, v_missing
      FROM input i LEFT JOIN ins ON ins.id = i.id;

    FOR r IN
        SELECT * FROM animus.submission_items(p_items) AS x
         WHERE x.ord = ANY (v_missing)
         ORDER BY x.ord
    LOOP
        LOOP
            SELECT w.id INTO v_canonical FROM animus.work_items w
             WHERE w.work_type = r.work_type AND w.dedup_key = r.dedup_key
               AND w.state NOT IN ('completed', 'dead', 'merged', 'cancelled')
             FOR SHARE;
            IF FOUND THEN
                INSERT INTO animus.work_items
                       (work_type, dedup_key, params, source, trigger, priority, state,
                        reason, queue, parent_id, replay_of, max_attempts, merged_into,
                        resolved_at, traceparent)
                VALUES (r.work_type, r.dedup_key, r.params, r.source, r.trigger,
                        r.priority, 'merged', 'duplicate of ' || v_canonical, p_queue,
                        r.parent_id, r.replay_of, r.max_attempts, v_canonical, now(),
                        r.traceparent)
                RETURNING * INTO v_row;
                EXIT;
            END IF;
            INSERT INTO animus.work_items AS w
                   (work_type, dedup_key, params, source, trigger, priority, state, reason,
                    queue, parent_id, replay_of, max_attempts, traceparent, gate)
            VALUES (r.work_type, r.dedup_key, r.params, r.source, r.trigger, r.priority,
                    r.state, r.reason, p_queue, r.parent_id, r.replay_of, r.max_attempts,
                    r.traceparent, r.gate)
            ON CONFLICT (work_type, dedup_key)
               WHERE dedup_key IS NOT NULL
                 AND state NOT IN ('completed', 'dead', 'merged', 'cancelled')
            DO NOTHING
            RETURNING * INTO v_row;
            EXIT WHEN FOUND;
        END LOOP;
        v_rows := v_rows || v_row;
        v_ords := v_ords || r.ord;
    END LOOP;

    IF v_missing IS NOT NULL THEN  -- back to input order
        SELECT array_agg(v_rows[g.i] ORDER BY v_ords[g.i]) INTO v_rows
          FROM generate_subscripts(v_rows, 1) AS g(i);
    END IF;

    PERFORM pgmq.send_batch(p_queue, m.msgs)
       FROM (SELECT array_agg(jsonb_build_object('id', w.id, 't', w.work_type, 'p', w.priority)
                              ORDER BY w.ordinality) AS msgs
               FROM unnest(v_rows) WITH ORDINALITY AS w
              WHERE w.state = 'queued') m
      WHERE m.msgs IS NOT NULL;

    RETURN QUERY SELECT * FROM unnest(v_rows);
END
$$;

DO $$
BEGIN
    IF current_setting('animus.submit_was_definer', true) = 'true' THEN
        ALTER FUNCTION animus.submit(text, jsonb) SECURITY DEFINER;
        ALTER FUNCTION animus.submit(text, jsonb) SET search_path = pg_catalog, pg_temp;
    END IF;
END
$$;
