-- Approvals inside a focus: `await focus.approval(why, role=..., quorum=...)` suspends the
-- focus (running -> waiting) with a wait of kind `approval`, {"kind": "approval",
-- "position": n, "why": text, "role": name, "quorum": k, "until": text|null}, and people
-- decide it with animus.decide, as they decide an item submitted behind a gate, by the same
-- rules: a reason, never the person who submitted the item, only members of animus_<role>
-- (or superusers), one decision per person, one rejection or `quorum` approvals decide.
-- The decision wakes the item (waiting -> queued, audited `woken`, its reason saying who
-- decided) through animus.wake_message, as a signal does; the resumed attempt reads the
-- decisions at its position and records the outcome as a step there. A timer (until) wakes
-- it undecided, as it wakes a wait for a signal.
--
-- An item may pass several such approvals in one focus and may have had a submit gate too:
-- each decision is kept under the step position of its approval (approvals.position; NULL
-- for the submit gate), and "one decision per person" holds per gate.

ALTER TABLE animus.approvals ADD COLUMN position int CHECK (position >= 1);
ALTER TABLE animus.approvals DROP CONSTRAINT approvals_work_id_approver_key;
CREATE UNIQUE INDEX approvals_once_per_gate
    ON animus.approvals (work_id, coalesce(position, 0), approver);

-- The reason of an item whose timer woke it: what it waited for, and that the time ran out.
CREATE FUNCTION animus.timer_woke(p_wait jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_wait->>'kind'
               WHEN 'sleep' THEN format('woken: sleep until %s ended', p_wait->>'until')
               WHEN 'approval' THEN format('woken: approval (%s x %s) timed out undecided',
                                          p_wait->>'quorum', p_wait->>'role')
               ELSE format('woken: wait for %s timed out',
                           quote_literal(coalesce(p_wait->>'event', '?'))) END
$$;

-- As in 0017, the reason of a timer's wake-up from animus.timer_woke.
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

-- As in 0017, and: a wait may be an approval (a why, one of the animus roles, a quorum of at
-- least 1), whose reason is that of a gate: `awaiting approval (k x role): why`.
CREATE OR REPLACE FUNCTION animus.suspend(p_id uuid, p_msg_id bigint, p_lease int,
                                          p_wait jsonb, p_wake_at timestamptz,
                                          p_duration_ms bigint, p_execution jsonb)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
    v_event text := quote_literal(coalesce(p_wait->>'event', '?'));
    v_kind text := p_wait->>'kind';
BEGIN
    PERFORM animus.require_transition(p_id, v_item.state, 'waiting');
    IF jsonb_typeof(p_wait) IS DISTINCT FROM 'object'
       OR v_kind IS NULL OR v_kind NOT IN ('sleep', 'event', 'approval')
       OR (v_kind = 'sleep' AND p_wake_at IS NULL) THEN
        RAISE EXCEPTION 'work item %: a wait is {"kind": "sleep" (with a wake time), '
                        '"event" or "approval", ...}, got %', p_id, coalesce(p_wait::text, 'null')
            USING ERRCODE = 'ANI01';
    END IF;
    IF v_kind = 'approval' AND (
           jsonb_typeof(p_wait->'position') IS DISTINCT FROM 'number'
           OR coalesce(btrim(p_wait->>'why'), '') = ''
           OR coalesce(p_wait->>'role', '') NOT IN ('reader', 'submitter', 'approver',
                                                    'operator', 'admin')
           OR jsonb_typeof(p_wait->'quorum') IS DISTINCT FROM 'number'
           OR (p_wait->>'quorum')::numeric < 1
           OR (p_wait->>'quorum')::numeric <> trunc((p_wait->>'quorum')::numeric)) THEN
        RAISE EXCEPTION 'work item %: an approval waits with a position, a why, a role (reader, '
                        'submitter, approver, operator or admin) and a quorum of 1 or more, got %',
                        p_id, p_wait::text
            USING ERRCODE = 'ANI01';
    END IF;
    UPDATE animus.work_items w
       SET state = 'waiting', wait = p_wait, wake_at = p_wake_at, lease = NULL,
           suspensions = w.suspensions + 1, duration_ms = p_duration_ms, updated_at = now(),
           reason = CASE WHEN v_kind = 'sleep'
                         THEN format('sleeping until %s', p_wait->>'until')
                         WHEN v_kind = 'approval'
                         THEN format('awaiting approval (%s x %s): %s', p_wait->>'quorum',
                                     p_wait->>'role', p_wait->>'why')
                              || coalesce(' (until ' || (p_wait->>'until') || ')', '')
                         WHEN p_wake_at IS NULL THEN format('waiting for %s', v_event)
                         ELSE format('waiting for %s until %s', v_event, p_wait->>'until') END
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM animus.record_execution(p_execution);
    IF v_kind = 'event' AND EXISTS (
           SELECT 1 FROM animus.signals s
            WHERE s.work_id = p_id AND s.event = p_wait->>'event'
              AND s.consumed_by_position IS NULL) THEN
        -- the signal arrived after the attempt last looked for it: woken at once
        UPDATE animus.work_items w
           SET state = 'queued', updated_at = now(),
               reason = format('woken: signal %s had arrived', v_event)
         WHERE w.id = p_id RETURNING w.* INTO v_item;
        PERFORM animus.wake_message(v_item);
        RETURN NEXT v_item;
        RETURN;
    END IF;
    PERFORM pgmq.set_vt(v_item.queue, p_msg_id, coalesce(p_wake_at, 'infinity'));
    PERFORM pg_notify('animus_work', json_build_object(
                'queue', v_item.queue, 'work_types', json_build_array(v_item.work_type),
                'wake_at', p_wake_at)::text);
    RETURN NEXT v_item;
END
$$;

-- As in 0009, and: an item waiting for an approval in its focus is decided too, under the
-- wait's position, by the wait's role and quorum; the decision that settles it (one
-- rejection, or the quorum reached) wakes the item (waiting -> queued) instead of ending or
-- queueing it. Deciding an item that waits for something else (a sleep, a signal) is refused
-- with what it waits for.
CREATE OR REPLACE FUNCTION animus.decide(p_work_id uuid, p_decision text, p_reason text)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    item animus.work_items;
    v_gate jsonb;
    v_position int;  -- NULL: the gate the item was submitted with; else the focus's approval
    v_which text;
    v_role text;
    v_quorum int;
    v_approvers text[];
    v_super bool;
BEGIN
    IF p_decision IS NULL OR p_decision NOT IN ('approve', 'reject') THEN
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
    IF item.state = 'awaiting_approval' THEN
        v_gate := item.gate;
        v_which := format('the rule %s', coalesce(item.gate->>'rule', '?'));
    ELSIF item.state = 'waiting' AND item.wait->>'kind' = 'approval' THEN
        v_gate := item.wait;
        v_position := (item.wait->>'position')::int;
        v_which := format('the approval at step %s of its focus', v_position);
    ELSIF item.state = 'waiting' THEN
        RAISE EXCEPTION 'work item % is waiting for %, not for an approval: only items awaiting '
                        'approval or waiting for one in their focus can be decided (signal it '
                        'with animus work signal, or cancel it)', p_work_id,
            CASE item.wait->>'kind'
                WHEN 'sleep' THEN format('a sleep until %s', item.wait->>'until')
                WHEN 'event' THEN format('the signal %s', quote_literal(item.wait->>'event'))
                ELSE coalesce(item.wait->>'kind', 'nothing known') END
            USING ERRCODE = 'ANI01';
    ELSE
        RAISE EXCEPTION 'work item % is %: only items awaiting approval can be decided',
            p_work_id, item.state USING ERRCODE = 'ANI01';
    END IF;
    IF item.requested_by = session_user THEN
        RAISE EXCEPTION '% requested work item % and cannot % it: another person must',
            session_user, p_work_id, p_decision USING ERRCODE = 'ANI03';
    END IF;
    v_role := 'animus_' || coalesce(v_gate->>'role', 'approver');
    v_quorum := coalesce((v_gate->>'quorum')::int, 1);
    SELECT rolsuper INTO v_super FROM pg_roles WHERE rolname = session_user;
    IF NOT coalesce(v_super, false) THEN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = v_role) THEN
            RAISE EXCEPTION 'role % does not exist: run animus roles setup', v_role
                USING ERRCODE = 'ANI03';
        END IF;
        IF NOT pg_has_role(session_user, v_role, 'MEMBER') THEN
            RAISE EXCEPTION '% may not decide work item %: % requires role %',
                session_user, p_work_id, v_which, v_role
                USING ERRCODE = 'ANI03';
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM animus.approvals
                WHERE work_id = p_work_id AND approver = session_user
                  AND position IS NOT DISTINCT FROM v_position) THEN
        RAISE EXCEPTION '% already decided %',
            session_user, CASE WHEN v_position IS NULL THEN format('work item %s', p_work_id)
                               ELSE format('the approval at step %s of work item %s',
                                           v_position, p_work_id) END
            USING ERRCODE = 'ANI03';
    END IF;

    INSERT INTO animus.approvals (work_id, approver, decision, reason, position)
    VALUES (p_work_id, session_user, p_decision, p_reason, v_position);
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (p_work_id, CASE p_decision WHEN 'approve' THEN 'approval' ELSE 'rejection' END,
            item.state, item.state,
            jsonb_strip_nulls(jsonb_build_object('source', item.source, 'actor', animus.actor())),
            jsonb_build_object('approver', session_user, 'decision', p_decision,
                               'reason', p_reason, 'gate', v_gate)
            || CASE WHEN v_position IS NULL THEN '{}'::jsonb
                    ELSE jsonb_build_object('position', v_position) END);

    IF p_decision = 'reject' THEN
        IF v_position IS NOT NULL THEN  -- the focus decides what a rejection means
            UPDATE animus.work_items
               SET state = 'queued', updated_at = now(),
                   reason = 'woken: rejected by ' || session_user || ': ' || p_reason
             WHERE id = p_work_id RETURNING * INTO item;
            PERFORM animus.wake_message(item);
            RETURN NEXT item;
            RETURN;
        END IF;
        RETURN QUERY UPDATE animus.work_items
           SET state = 'dead', reason = 'rejected by ' || session_user || ': ' || p_reason,
               resolved_at = now(), updated_at = now()
         WHERE id = p_work_id RETURNING *;
        RETURN;
    END IF;
    SELECT array_agg(approver ORDER BY at, id) INTO v_approvers FROM animus.approvals
     WHERE work_id = p_work_id AND decision = 'approve'
       AND position IS NOT DISTINCT FROM v_position;
    IF cardinality(v_approvers) >= v_quorum THEN
        IF v_position IS NOT NULL THEN
            UPDATE animus.work_items
               SET state = 'queued', updated_at = now(),
                   reason = 'woken: approved by ' || array_to_string(v_approvers, ', ')
             WHERE id = p_work_id RETURNING * INTO item;
            PERFORM animus.wake_message(item);
            RETURN NEXT item;
            RETURN;
        END IF;
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

-- New functions are callable by PUBLIC until revoked (the replaced ones keep their grants).
REVOKE EXECUTE ON FUNCTION animus.timer_woke(jsonb) FROM PUBLIC;
