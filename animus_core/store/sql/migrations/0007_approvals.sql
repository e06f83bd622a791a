-- Approval gates: decisions are append-only rows; animus.decide applies them.
--
-- decide() runs as its owner (SECURITY DEFINER) so that approvers need no write access to
-- work_items; it checks the caller itself: the role the rule asked for, not the requester,
-- one decision per person. session_user is the person connected, also inside the function.

CREATE TABLE animus.approvals (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    work_id   uuid NOT NULL REFERENCES animus.work_items (id),
    approver  text NOT NULL DEFAULT session_user,
    decision  text NOT NULL CHECK (decision IN ('approve', 'reject')),
    reason    text NOT NULL CHECK (btrim(reason) <> ''),
    at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE (work_id, approver)
);
CREATE TRIGGER approvals_append_only BEFORE UPDATE OR DELETE ON animus.approvals
    FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();
CREATE TRIGGER approvals_no_truncate BEFORE TRUNCATE ON animus.approvals
    FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

CREATE FUNCTION animus.decide(p_work_id uuid, p_decision text, p_reason text)
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
    WITH a AS (
        INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
        VALUES (p_work_id, CASE p_decision WHEN 'approve' THEN 'approval' ELSE 'rejection' END,
                item.state, item.state,
                jsonb_strip_nulls(jsonb_build_object('source', item.source,
                                                     'actor', animus.actor())),
                jsonb_build_object('approver', session_user, 'decision', p_decision,
                                   'reason', p_reason, 'gate', item.gate))
        RETURNING id)
    INSERT INTO animus.audit_unsealed SELECT id FROM a;

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
