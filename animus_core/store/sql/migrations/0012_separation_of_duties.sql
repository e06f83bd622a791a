-- Separation of duties, kept by the database.
--
-- No animus role writes work items or audit rows directly any more (`animus roles setup`
-- takes those rights away): submitting, deciding and every state move an engine or a person
-- makes go through the functions below, which run as the schema's owner (SECURITY DEFINER,
-- with a fixed search_path), lock the item, check the lease where there is one and the
-- transition, and only then write. Each is granted to the role that may call it.
--
-- The database also keeps, for everyone, the table's owner and superusers included (short of
-- disabling triggers):
--   * every change of any column of a work item writes an audit row in its transaction;
--   * requested_by is the session's user when the item is inserted, and never changes;
--   * an audit row's db_user is the session's user, whatever the INSERT says.

-- ---------------------------------------------------------------------------------------
-- Who did it: the session's own role, never a value the writer chose.
-- ---------------------------------------------------------------------------------------

CREATE FUNCTION animus.audit_log_session_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.db_user := session_user;
    RETURN NEW;
END
$$;

-- The WHEN clause keeps the usual insert (db_user left to its default) free of a function call.
CREATE TRIGGER audit_log_db_user BEFORE INSERT ON animus.audit_log
    FOR EACH ROW WHEN (NEW.db_user IS DISTINCT FROM session_user)
    EXECUTE FUNCTION animus.audit_log_session_user();

CREATE FUNCTION animus.work_items_session_user() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.requested_by := session_user;
    RETURN NEW;
END
$$;

CREATE TRIGGER work_items_requested_by BEFORE INSERT ON animus.work_items
    FOR EACH ROW WHEN (NEW.requested_by IS DISTINCT FROM session_user)
    EXECUTE FUNCTION animus.work_items_session_user();

-- Whoever asked for an item is who may not approve it: that must never be rewritten. The id
-- is what every audit row and approval points at.
CREATE FUNCTION animus.work_items_refuse_rewrite() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% of work item % cannot change',
        CASE WHEN OLD.id IS DISTINCT FROM NEW.id THEN 'the id' ELSE 'requested_by' END, OLD.id
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'requested_by is the database user who submitted the item';
END
$$;

CREATE TRIGGER work_items_fixed_columns BEFORE UPDATE OF id, requested_by ON animus.work_items
    FOR EACH ROW
    WHEN (OLD.id IS DISTINCT FROM NEW.id OR OLD.requested_by IS DISTINCT FROM NEW.requested_by)
    EXECUTE FUNCTION animus.work_items_refuse_rewrite();

-- ---------------------------------------------------------------------------------------
-- Every change of any column is audited. A state change writes its rows as before (they
-- record the columns a state move sets: reason, attempts, error, outcome, duration; the
-- lease, message and timestamps follow from the move). Any other change writes a `changed`
-- row naming each changed column with its old and new value (updated_at excepted: it changes
-- with every write).
--
-- Two definer functions record their change in a row of their own in the same transaction,
-- so the change is not recorded twice: decide() (an approval short of the quorum changes the
-- reason) and cancel() (the cancel request). Nobody but those functions and the owner can
-- update work items, and neither can pass off another change as one of those.
--
-- The columns compared first are every column but the ones a state move sets, so that the
-- hot path (claim, complete: state moves only) never builds the JSON of a row. A test keeps
-- this list in step with the table's columns.
-- ---------------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION animus.work_items_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_actor text := animus.actor();
BEGIN
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id, s.to_state::text, s.from_state, s.to_state,
           JSON_OBJECT('source': n.source, 'trigger': n.trigger, 'actor': v_actor
                       ABSENT ON NULL RETURNING jsonb),
           JSON_OBJECT('reason': n.reason, 'attempts': s.attempts,
                       'error': CASE WHEN n.state IN ('failed', 'dead') THEN n.outcome_error END,
                       'outcome': CASE WHEN n.state = 'completed' THEN n.outcome_data END,
                       'duration_ms': CASE WHEN n.state IN ('completed', 'failed')
                                           THEN n.duration_ms END
                       ABSENT ON NULL RETURNING jsonb)
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

    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id, 'changed', n.state, n.state,
           JSON_OBJECT('source': n.source, 'trigger': n.trigger, 'actor': v_actor
                       ABSENT ON NULL RETURNING jsonb),
           jsonb_build_object('columns', c.columns)
      FROM new_rows n
      JOIN old_rows o
        ON o.id = n.id
       AND (o.state = n.state
            OR (o.work_type, o.dedup_key, o.params, o.source, o.trigger, o.priority, o.queue,
                o.parent_id, o.merged_into, o.replay_of, o.traceparent, o.gate, o.max_attempts,
                o.created_at, o.usage, o.cancel_requested)
               IS DISTINCT FROM
               (n.work_type, n.dedup_key, n.params, n.source, n.trigger, n.priority, n.queue,
                n.parent_id, n.merged_into, n.replay_of, n.traceparent, n.gate, n.max_attempts,
                n.created_at, n.usage, n.cancel_requested))
     CROSS JOIN LATERAL (
         SELECT jsonb_object_agg(nc.key, jsonb_build_object('old', oc.value, 'new', nc.value))
                AS columns
           FROM jsonb_each(to_jsonb(n)) AS nc
           JOIN jsonb_each(to_jsonb(o)) AS oc ON oc.key = nc.key
          WHERE nc.value IS DISTINCT FROM oc.value
            AND nc.key <> ALL (CASE WHEN o.state = n.state THEN ARRAY['updated_at']
                                    ELSE ARRAY['state', 'reason', 'attempts', 'outcome_data',
                                               'outcome_error', 'duration_ms', 'msg_id',
                                               'lease', 'resolved_at', 'updated_at'] END)) c
     WHERE c.columns IS NOT NULL
       AND NOT (o.state = n.state AND EXISTS (
               SELECT 1 FROM animus.audit_log a
                WHERE a.work_id = n.id AND a.at = now() AND a.db_user = session_user
                  AND CASE a.event
                          WHEN 'approval' THEN c.columns - 'reason' = '{}'
                          WHEN 'cancel_requested' THEN c.columns - 'cancel_requested' = '{}'
                          ELSE false END))
     ORDER BY n.id;
    RETURN NULL;
END
$$;

-- ---------------------------------------------------------------------------------------
-- Helpers of the definer functions (they run as the owner inside them; nobody is granted
-- them). Their messages are the ones animus_core/states.py and db.py gave before.
-- ---------------------------------------------------------------------------------------

CREATE FUNCTION animus.require_transition(p_id uuid, p_from animus.work_state,
                                          p_to animus.work_state) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_allowed text;
BEGIN
    IF EXISTS (SELECT 1 FROM animus.transitions t
                WHERE t.from_state = p_from AND t.to_state = p_to) THEN
        RETURN;
    END IF;
    SELECT string_agg(t.to_state::text, ', ' ORDER BY t.to_state::text) INTO v_allowed
      FROM animus.transitions t WHERE t.from_state = p_from;
    RAISE EXCEPTION 'illegal transition for work item %: % -> % (from % the item may go to: %)',
        p_id, p_from, p_to, p_from, coalesce(v_allowed, 'none: it is finished')
        USING ERRCODE = 'ANI01';
END
$$;

-- The item, locked for the caller's transaction.
CREATE FUNCTION animus.lock_item(p_id uuid) RETURNS animus.work_items
LANGUAGE plpgsql AS $$
DECLARE
    v_item animus.work_items;
BEGIN
    SELECT * INTO v_item FROM animus.work_items WHERE id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no work item with id %', p_id USING ERRCODE = 'ANI04';
    END IF;
    RETURN v_item;
END
$$;

-- The item, locked, if the caller still holds the lease it was given by its claim.
CREATE FUNCTION animus.held_item(p_id uuid, p_msg_id bigint, p_lease int)
RETURNS animus.work_items
LANGUAGE plpgsql AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_id);
BEGIN
    IF v_item.msg_id IS DISTINCT FROM p_msg_id OR v_item.lease IS DISTINCT FROM p_lease THEN
        RAISE EXCEPTION 'lease lost on work item %: it was claimed again after the lease expired',
            p_id USING ERRCODE = 'ANI02';
    END IF;
    RETURN v_item;
END
$$;

-- Make the item's message visible p_delay seconds from now (to the microsecond, so that a
-- timer set for the same delay finds it visible), or send a new one if it is gone.
CREATE FUNCTION animus.requeue_message(p_item animus.work_items, p_delay float8) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_at timestamptz := clock_timestamp() + make_interval(secs => greatest(p_delay, 0));
BEGIN
    IF p_item.msg_id IS NOT NULL
       AND EXISTS (SELECT 1 FROM pgmq.set_vt(p_item.queue, p_item.msg_id, v_at)) THEN
        RETURN;
    END IF;
    PERFORM pgmq.send(p_item.queue, jsonb_build_object('id', p_item.id, 't', p_item.work_type,
                                                       'p', p_item.priority), v_at);
    PERFORM pg_notify('animus_work', json_build_object(
                'queue', p_item.queue, 'work_types', json_build_array(p_item.work_type))::text);
END
$$;

-- Archive the item's message so that no engine claims it again. A queued item never claimed
-- has no msg_id recorded; its message is found by content (rare: by hand).
CREATE FUNCTION animus.drop_message(p_item animus.work_items) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_ids bigint[];
BEGIN
    IF p_item.msg_id IS NOT NULL THEN
        v_ids := ARRAY[p_item.msg_id];
    ELSE
        EXECUTE format('SELECT array_agg(msg_id) FROM pgmq.%I WHERE message->>''id'' = $1',
                       'q_' || p_item.queue) INTO v_ids USING p_item.id::text;
    END IF;
    IF v_ids IS NOT NULL THEN
        PERFORM pgmq.archive(p_item.queue, v_ids);
    END IF;
END
$$;

-- ---------------------------------------------------------------------------------------
-- The moves. Each runs as the owner and is granted to operators by `animus roles setup`.
-- ---------------------------------------------------------------------------------------

-- claimed -> running: the focus begins; counts one attempt.
CREATE FUNCTION animus.start(p_id uuid, p_msg_id bigint, p_lease int)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
BEGIN
    PERFORM animus.require_transition(p_id, v_item.state, 'running');
    RETURN QUERY UPDATE animus.work_items w
                    SET state = 'running', attempts = w.attempts + 1, updated_at = now()
                  WHERE w.id = p_id RETURNING w.*;
END
$$;

-- running -> failed with the error as the reason.
CREATE FUNCTION animus.fail(p_id uuid, p_msg_id bigint, p_lease int, p_error text,
                            p_duration_ms bigint)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
BEGIN
    PERFORM animus.require_transition(p_id, v_item.state, 'failed');
    RETURN QUERY UPDATE animus.work_items w
                    SET state = 'failed', outcome_error = p_error, reason = p_error,
                        duration_ms = p_duration_ms, updated_at = now()
                  WHERE w.id = p_id RETURNING w.*;
END
$$;

-- claimed|running -> queued without counting a failure; an attempt counted by start() is
-- given back, and the message is visible again at once. Returns the state it left.
CREATE FUNCTION animus.release(p_id uuid, p_msg_id bigint, p_lease int, p_reason text)
RETURNS TABLE (was animus.work_state, item animus.work_items)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
    v_was animus.work_state := v_item.state;
BEGIN
    PERFORM animus.require_transition(p_id, v_was, 'queued');
    IF v_was NOT IN ('claimed', 'running') THEN
        RAISE EXCEPTION 'work item % is %: only claimed or running items can be released '
                        '(retry or dead-letter a failed one)', p_id, v_was
            USING ERRCODE = 'ANI01';
    END IF;
    UPDATE animus.work_items w
       SET state = 'queued', reason = p_reason, updated_at = now(),
           attempts = w.attempts - CASE WHEN v_was = 'running' THEN 1 ELSE 0 END
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM pgmq.set_vt(v_item.queue, p_msg_id, 0);
    RETURN QUERY SELECT v_was, v_item;
END
$$;

-- failed -> queued, visible again after p_delay seconds.
CREATE FUNCTION animus.retry(p_id uuid, p_delay float8, p_reason text)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_id);
BEGIN
    PERFORM animus.require_transition(p_id, v_item.state, 'queued');
    IF v_item.state <> 'failed' THEN
        RAISE EXCEPTION 'work item % is %: only failed items retry', p_id, v_item.state
            USING ERRCODE = 'ANI01';
    END IF;
    UPDATE animus.work_items w
       SET state = 'queued', updated_at = now(),
           reason = coalesce(nullif(p_reason, ''),
                             format('retry %s/%s', w.attempts + 1, w.max_attempts))
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM animus.requeue_message(v_item, p_delay);
    RETURN NEXT v_item;
END
$$;

-- End an item as dead (from queued or failed, or from running through failed). An item
-- awaiting approval is ended by a decision only. Returns the state it was ended from.
CREATE FUNCTION animus.dead_letter(p_id uuid, p_reason text)
RETURNS TABLE (was animus.work_state, item animus.work_items)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_id);
    v_was animus.work_state := v_item.state;
BEGIN
    IF v_was = 'awaiting_approval' THEN
        RAISE EXCEPTION 'work item % is awaiting_approval: only a decision ends it '
                        '(animus approve or animus reject)', p_id
            USING ERRCODE = 'ANI01';
    END IF;
    IF v_was = 'running' THEN
        UPDATE animus.work_items w
           SET state = 'failed', outcome_error = p_reason, reason = p_reason, updated_at = now()
         WHERE w.id = p_id;
        v_was := 'failed';
    END IF;
    PERFORM animus.require_transition(p_id, v_was, 'dead');
    UPDATE animus.work_items w
       SET state = 'dead', reason = p_reason, outcome_error = coalesce(w.outcome_error, p_reason),
           resolved_at = now(), updated_at = now()
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM animus.drop_message(v_item);
    RETURN QUERY SELECT v_was, v_item;
END
$$;

-- queued -> cancelled. A claimed or running item cannot be cancelled: the request is
-- recorded (and audited), and the engine running it, told on animus_cancel, ends it dead.
CREATE FUNCTION animus.cancel(p_id uuid, p_reason text)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_id);
BEGIN
    IF v_item.state IN ('claimed', 'running') THEN
        -- first, so that the update below is known to be this request
        INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
        VALUES (p_id, 'cancel_requested', v_item.state, v_item.state,
                JSON_OBJECT('source': v_item.source, 'actor': animus.actor()
                            ABSENT ON NULL RETURNING jsonb),
                jsonb_build_object('reason', p_reason));
        PERFORM pg_notify('animus_cancel', p_id::text);
        RETURN QUERY UPDATE animus.work_items w
                        SET cancel_requested = p_reason, updated_at = now()
                      WHERE w.id = p_id RETURNING w.*;
        RETURN;
    END IF;
    PERFORM animus.require_transition(p_id, v_item.state, 'cancelled');
    UPDATE animus.work_items w
       SET state = 'cancelled', reason = p_reason, resolved_at = now(), updated_at = now()
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM animus.drop_message(v_item);
    RETURN NEXT v_item;
END
$$;

-- Add one attempt's model usage ({"models": {model: {kind: tokens}}, "cost_usd": x}) to the
-- item's totals (cost rounded to 6 decimals).
CREATE FUNCTION animus.add_usage(p_id uuid, p_usage jsonb) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_old jsonb;
BEGIN
    SELECT coalesce(w.usage, '{}') INTO v_old FROM animus.work_items w
     WHERE w.id = p_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    UPDATE animus.work_items w SET usage = jsonb_build_object(
        'models', (
            WITH entries AS (
                SELECT e.model, e.tokens
                  FROM jsonb_each(coalesce(v_old->'models', '{}')) AS e(model, tokens)
                UNION ALL
                SELECT e.model, e.tokens
                  FROM jsonb_each(coalesce(p_usage->'models', '{}')) AS e(model, tokens)
            ), sums AS (
                SELECT x.model, jsonb_object_agg(x.kind, x.n) AS tokens
                  FROM (SELECT e.model, k.kind, sum(k.n::numeric) AS n
                          FROM entries e CROSS JOIN LATERAL jsonb_each_text(e.tokens) AS k(kind, n)
                         GROUP BY e.model, k.kind) x
                 GROUP BY x.model
            )
            SELECT coalesce(jsonb_object_agg(m.model, coalesce(s.tokens, '{}')), '{}')
              FROM (SELECT DISTINCT e.model FROM entries e) m
              LEFT JOIN sums s ON s.model = m.model),
        'cost_usd', trim_scale(round(coalesce((v_old->>'cost_usd')::numeric, 0)
                                     + coalesce((p_usage->>'cost_usd')::numeric, 0), 6)))
     WHERE w.id = p_id;
END
$$;

-- The hot path and submit run as the owner too. (`animus roles setup` did this for submit;
-- it now asserts it for every definer function, so a migration that replaces one of them
-- without the attributes is set right by running it again.)
ALTER FUNCTION animus.submit(text, jsonb) SECURITY DEFINER;
ALTER FUNCTION animus.submit(text, jsonb) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION animus.claim(text, int, int, text[], bool) SECURITY DEFINER;
ALTER FUNCTION animus.claim(text, int, int, text[], bool) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION animus.complete(uuid[], bigint[], int[], jsonb[], bigint[]) SECURITY DEFINER;
ALTER FUNCTION animus.complete(uuid[], bigint[], int[], jsonb[], bigint[])
    SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION animus.extend_leases(text, uuid[], bigint[], int[], int) SECURITY DEFINER;
ALTER FUNCTION animus.extend_leases(text, uuid[], bigint[], int[], int)
    SET search_path = pg_catalog, pg_temp;

-- New functions are callable by PUBLIC until revoked: revoke at once, and on a database whose
-- roles are set up already, apply the new rules now rather than at the next `roles setup`.
REVOKE EXECUTE ON FUNCTION
    animus.audit_log_session_user(), animus.work_items_session_user(),
    animus.work_items_refuse_rewrite(),
    animus.require_transition(uuid, animus.work_state, animus.work_state),
    animus.lock_item(uuid), animus.held_item(uuid, bigint, int),
    animus.requeue_message(animus.work_items, float8), animus.drop_message(animus.work_items),
    animus.start(uuid, bigint, int), animus.fail(uuid, bigint, int, text, bigint),
    animus.release(uuid, bigint, int, text), animus.retry(uuid, float8, text),
    animus.dead_letter(uuid, text), animus.cancel(uuid, text), animus.add_usage(uuid, jsonb),
    animus.extend_leases(text, uuid[], bigint[], int[], int)
  FROM PUBLIC;

DO $$
DECLARE
    r text;
BEGIN
    FOR r IN SELECT rolname FROM pg_roles
              WHERE rolname IN ('animus_reader', 'animus_submitter', 'animus_approver',
                                'animus_operator', 'animus_admin') LOOP
        EXECUTE format('REVOKE INSERT, UPDATE ON animus.work_items FROM %I', r);
        EXECUTE format('REVOKE INSERT ON animus.audit_log FROM %I', r);
    END LOOP;
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_operator') THEN
        GRANT EXECUTE ON FUNCTION
            animus.start(uuid, bigint, int), animus.fail(uuid, bigint, int, text, bigint),
            animus.release(uuid, bigint, int, text), animus.retry(uuid, float8, text),
            animus.dead_letter(uuid, text), animus.cancel(uuid, text),
            animus.add_usage(uuid, jsonb), animus.extend_leases(text, uuid[], bigint[], int[], int)
          TO animus_operator;
    END IF;
END
$$;
