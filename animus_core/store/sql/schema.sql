-- The animus schema as the migrations leave it (sql/migrations/), for reading: made by
-- scripts/schema from a freshly migrated database (pg_dump --schema-only --schema=animus).
-- Do not edit: change the schema with a new migration, then run scripts/schema.
-- Not shown: ownership, and the grants to the animus_* roles, which `animus roles setup`
-- makes (animus_core/store/roles.py).

CREATE SCHEMA animus;

CREATE TYPE animus.work_state AS ENUM (
    'created',
    'queued',
    'awaiting_approval',
    'claimed',
    'running',
    'waiting',
    'failed',
    'completed',
    'dead',
    'merged',
    'cancelled'
);

CREATE FUNCTION animus.actor() RETURNS text
    LANGUAGE sql STABLE
    AS $$
    SELECT nullif(current_setting('animus.actor', true), '')
$$;

CREATE FUNCTION animus.add_usage(p_id uuid, p_usage jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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

CREATE FUNCTION animus.archive_messages(p_queue text, p_msg_ids bigint[]) RETURNS void
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
BEGIN
    IF p_queue = 'work' THEN
        PERFORM animus.q_work_archive(p_msg_ids);
    ELSE
        EXECUTE format('SELECT animus.%I($1)', 'q_' || p_queue || '_archive') USING p_msg_ids;
    END IF;
END
$_$;

CREATE FUNCTION animus.audit_by_statement(p_rows integer) RETURNS void
    LANGUAGE sql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT set_config('animus.audit_mode', CASE WHEN p_rows >= 2 THEN 'statement'
                                                ELSE 'row' END, true)
$$;

CREATE FUNCTION animus.audit_log_session_user() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    NEW.db_user := session_user;
    RETURN NEW;
END
$$;

CREATE FUNCTION animus.new_id() RETURNS uuid
    LANGUAGE sql
    AS $$ SELECT uuidv7() $$;

CREATE TABLE animus.work_items (
    id uuid DEFAULT animus.new_id() NOT NULL,
    work_type text NOT NULL,
    dedup_key text,
    params jsonb DEFAULT '{}'::jsonb NOT NULL,
    source text NOT NULL,
    trigger text,
    priority integer DEFAULT 0 NOT NULL,
    state animus.work_state NOT NULL,
    reason text,
    queue text DEFAULT 'work'::text NOT NULL,
    parent_id uuid,
    merged_into uuid,
    replay_of uuid,
    traceparent text,
    gate jsonb,
    requested_by text DEFAULT SESSION_USER NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    max_attempts integer DEFAULT 3 NOT NULL,
    outcome_data jsonb,
    outcome_error text,
    duration_ms bigint,
    msg_id bigint,
    lease integer,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    resolved_at timestamp with time zone,
    usage jsonb,
    cancel_requested text,
    wait jsonb,
    wake_at timestamp with time zone,
    suspensions integer DEFAULT 0 NOT NULL,
    CONSTRAINT work_items_check CHECK (((state = 'merged'::animus.work_state) = (merged_into IS NOT NULL))),
    CONSTRAINT work_items_dedup_key_check CHECK ((dedup_key <> ''::text)),
    CONSTRAINT work_items_max_attempts_check CHECK ((max_attempts >= 1)),
    CONSTRAINT work_items_params_check CHECK ((jsonb_typeof(params) = 'object'::text)),
    CONSTRAINT work_items_source_check CHECK ((source <> ''::text)),
    CONSTRAINT work_items_suspensions_check CHECK ((suspensions >= 0)),
    CONSTRAINT work_items_work_type_check CHECK ((work_type <> ''::text))
)
WITH (autovacuum_vacuum_scale_factor='0.02', autovacuum_vacuum_threshold='1000');

CREATE FUNCTION animus.cancel(p_id uuid, p_reason text) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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

CREATE FUNCTION animus.cancel_attempt(p_id uuid, p_msg_id bigint, p_lease integer, p_duration_ms bigint, p_execution jsonb, p_reason_chars integer) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
    v_reason text := format('cancelled while %s: %s', v_item.state,
                            coalesce(v_item.cancel_requested, 'by request'));
BEGIN
    IF length(v_reason) > p_reason_chars THEN
        v_reason := format('%s [... %s more characters cut]', left(v_reason, p_reason_chars - 40),
                           length(v_reason) - (p_reason_chars - 40));
    END IF;
    PERFORM animus.fail(p_id, p_msg_id, p_lease, v_reason, p_duration_ms);
    IF p_execution IS NOT NULL THEN
        PERFORM animus.record_execution(jsonb_set(p_execution, '{error}', to_jsonb(v_reason)));
    END IF;
    RETURN QUERY SELECT (d.item).* FROM animus.dead_letter(p_id, v_reason) d;
END
$$;

CREATE FUNCTION animus.children_text(p_wait jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT CASE jsonb_array_length(p_wait->'children') WHEN 1 THEN '1 child'
                ELSE jsonb_array_length(p_wait->'children') || ' children' END
$$;

CREATE FUNCTION animus.children_unfinished(p_wait jsonb) RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    SELECT EXISTS (
        SELECT 1 FROM jsonb_array_elements_text(p_wait->'children') AS c(id)
          JOIN animus.work_items w ON w.id = c.id::uuid
          LEFT JOIN animus.work_items m ON m.id = w.merged_into
         WHERE coalesce(m.state, w.state) NOT IN ('completed', 'dead', 'cancelled'))
$$;

CREATE FUNCTION animus.claim(p_queue text, p_qty integer, p_vt_seconds integer, p_work_types text[], p_start boolean) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    AS $_$
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
$_$;

CREATE FUNCTION animus.claim(p_queue text, p_qty integer, p_vt_seconds integer, p_work_types text[], p_start boolean, p_max_attempts jsonb) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    AS $$
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

CREATE FUNCTION animus.complete(p_ids uuid[], p_msg_ids bigint[], p_leases integer[], p_data jsonb[], p_duration_ms bigint[]) RETURNS SETOF uuid
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    SET enable_memoize TO 'off'
    AS $$
DECLARE
    v_done uuid[];
    v_queues text[];
    v_msgs bigint[];
    bad record;
BEGIN
    PERFORM 1 FROM (SELECT k.id FROM unnest(p_ids) AS k(id) ORDER BY k.id) AS k
         CROSS JOIN LATERAL (SELECT 1 FROM animus.work_items w WHERE w.id = k.id
                              OFFSET 0 FOR UPDATE) AS locked;
    PERFORM animus.audit_by_statement(cardinality(p_ids));
    WITH x AS (
        SELECT * FROM unnest(p_ids, p_msg_ids, p_leases, p_data, p_duration_ms)
                 AS x(id, msg_id, lease, data, duration_ms)
    ), upd AS (
        UPDATE animus.work_items w
           SET state = 'completed', outcome_data = x.data, outcome_error = NULL,
               duration_ms = x.duration_ms, reason = 'completed', resolved_at = now(),
               updated_at = now()
          FROM x CROSS JOIN LATERAL (SELECT i.ctid FROM animus.work_items i
                                      WHERE i.id = x.id OFFSET 0) AS found
         WHERE w.ctid = found.ctid AND w.msg_id = x.msg_id AND w.lease = x.lease
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

CREATE FUNCTION animus.copy_steps(p_to uuid, p_from uuid, p_before text) RETURNS integer
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_to);
    v_position int;
    v_names text;
    v_count int;
BEGIN
    IF v_item.replay_of IS DISTINCT FROM p_from THEN
        RAISE EXCEPTION 'work item % is not a rerun or replay of %: its steps cannot be copied',
            p_to, p_from USING ERRCODE = 'ANI03';
    END IF;
    IF v_item.requested_by IS DISTINCT FROM session_user THEN
        RAISE EXCEPTION '% did not submit work item %: only its submitter copies steps into it',
            session_user, p_to USING ERRCODE = 'ANI03';
    END IF;
    IF v_item.attempts > 0 OR v_item.created_at <> now()
       OR EXISTS (SELECT 1 FROM animus.steps s WHERE s.work_id = p_to) THEN
        RAISE EXCEPTION 'work item % was not submitted in this transaction, or has run: '
                        'steps are copied only into the item as it is submitted', p_to
            USING ERRCODE = 'ANI01';
    END IF;
    SELECT min(s.position) INTO v_position FROM animus.steps s
     WHERE s.work_id = p_from AND s.name = p_before;
    IF v_position IS NULL THEN
        SELECT string_agg(quote_literal(s.name), ', ' ORDER BY s.position) INTO v_names
          FROM animus.steps s WHERE s.work_id = p_from;
        RAISE EXCEPTION 'work item % has no recorded step named %: its steps are %',
            p_from, quote_literal(p_before), coalesce(v_names, 'none')
            USING ERRCODE = 'ANI04';
    END IF;
    INSERT INTO animus.steps (work_id, position, name, attempt, result, result_hash,
                              started_at, finished_at, duration_ms, copied_from)
    SELECT p_to, s.position, s.name, s.attempt, s.result, s.result_hash, s.started_at,
           s.finished_at, s.duration_ms, coalesce(s.copied_from, p_from)
      FROM animus.steps s
     WHERE s.work_id = p_from AND s.position < v_position;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (p_to, 'steps_copied', v_item.state, v_item.state,
            JSON_OBJECT('source': v_item.source, 'actor': animus.actor()
                        ABSENT ON NULL RETURNING jsonb),
            jsonb_build_object('from', p_from, 'before', p_before, 'steps', v_count));
    RETURN v_count;
END
$$;

CREATE FUNCTION animus.create_queue(p_queue text) RETURNS void
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF to_regclass(format('pgmq.%I', 'q_' || p_queue || '_ready')) IS NOT NULL
       AND to_regprocedure(format('animus.%I(jsonb, timestamptz)', 'q_' || p_queue || '_send'))
           IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pgmq.create(p_queue);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I '
                   '(((message->>''p'')::int) DESC, vt, msg_id)',
                   'q_' || p_queue || '_ready', 'q_' || p_queue);
    EXECUTE format('DROP INDEX IF EXISTS pgmq.%I', 'q_' || p_queue || '_prio');
    EXECUTE format('DROP INDEX IF EXISTS pgmq.%I', 'q_' || p_queue || '_vt_idx');
    EXECUTE format('ALTER TABLE pgmq.%I SET (fillfactor = 50)', 'q_' || p_queue);
    PERFORM animus.queue_functions(p_queue);
END
$$;

CREATE FUNCTION animus.dead_letter(p_id uuid, p_reason text) RETURNS TABLE(was animus.work_state, item animus.work_items)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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

CREATE FUNCTION animus.decide(p_work_id uuid, p_decision text, p_reason text) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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

CREATE FUNCTION animus.drop_message(p_item animus.work_items) RETURNS void
    LANGUAGE plpgsql
    AS $_$
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
        PERFORM animus.archive_messages(p_item.queue, v_ids);
    END IF;
END
$_$;

CREATE FUNCTION animus.engine_deregister(p_id uuid) RETURNS void
    LANGUAGE sql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    DELETE FROM animus.engines WHERE id = p_id
$$;

CREATE FUNCTION animus.engine_heartbeat(p_id uuid, p_running jsonb, p_schedules jsonb) RETURNS TABLE(registered boolean, stop_requested boolean, stop_grace double precision)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    RETURN QUERY
        UPDATE animus.engines e
           SET last_seen = now(), running = coalesce(p_running, '{}'),
               schedules = coalesce(p_schedules, e.schedules)
         WHERE e.id = p_id
        RETURNING true, e.stop_requested_at IS NOT NULL, e.stop_grace;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, false, NULL::float8;
    END IF;
END
$$;

CREATE TABLE animus.engines (
    id uuid NOT NULL,
    host text NOT NULL,
    pid integer NOT NULL,
    version text NOT NULL,
    db_user text DEFAULT SESSION_USER NOT NULL,
    started_at timestamp with time zone DEFAULT now() NOT NULL,
    last_seen timestamp with time zone DEFAULT now() NOT NULL,
    heartbeat_seconds double precision NOT NULL,
    concurrency integer NOT NULL,
    queues text[] NOT NULL,
    faculties jsonb DEFAULT '[]'::jsonb NOT NULL,
    disabled jsonb DEFAULT '{}'::jsonb NOT NULL,
    running jsonb DEFAULT '{}'::jsonb NOT NULL,
    schedules jsonb DEFAULT '[]'::jsonb NOT NULL,
    stop_requested_at timestamp with time zone,
    stop_requested_by text,
    stop_grace double precision,
    CONSTRAINT engines_concurrency_check CHECK ((concurrency > 0)),
    CONSTRAINT engines_heartbeat_seconds_check CHECK ((heartbeat_seconds > (0)::double precision))
);

CREATE FUNCTION animus.engine_lost(p_engine animus.engines) RETURNS boolean
    LANGUAGE sql STABLE
    AS $$
    SELECT p_engine.last_seen < now() - make_interval(secs => 3 * p_engine.heartbeat_seconds)
$$;

CREATE FUNCTION animus.engine_register(p_id uuid, p_host text, p_pid integer, p_version text, p_heartbeat double precision, p_concurrency integer, p_queues text[], p_faculties jsonb, p_disabled jsonb, p_schedules jsonb) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    DELETE FROM animus.engines e WHERE e.last_seen < now() - interval '1 day';
    INSERT INTO animus.engines AS e (id, host, pid, version, heartbeat_seconds, concurrency,
                                     queues, faculties, disabled, schedules)
    VALUES (p_id, p_host, p_pid, p_version, p_heartbeat, p_concurrency, p_queues,
            coalesce(p_faculties, '[]'), coalesce(p_disabled, '{}'),
            coalesce(p_schedules, '[]'))
    ON CONFLICT (id) DO UPDATE
       SET host = excluded.host, pid = excluded.pid, version = excluded.version,
           db_user = session_user, last_seen = now(),
           heartbeat_seconds = excluded.heartbeat_seconds,
           concurrency = excluded.concurrency, queues = excluded.queues,
           faculties = excluded.faculties, disabled = excluded.disabled,
           schedules = excluded.schedules;
END
$$;

CREATE FUNCTION animus.extend_leases(p_queue text, p_ids uuid[], p_msg_ids bigint[], p_leases integer[], p_seconds integer) RETURNS SETOF uuid
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    AS $_$
BEGIN
    PERFORM 1 FROM (SELECT k.id FROM unnest(p_ids) AS k(id) ORDER BY k.id) AS k
         CROSS JOIN LATERAL (SELECT 1 FROM animus.work_items w WHERE w.id = k.id
                              OFFSET 0 FOR SHARE) AS locked;
    EXECUTE format($q$
        UPDATE pgmq.%I m SET vt = clock_timestamp() + make_interval(secs => $3)
          FROM unnest($1::bigint[], $2::int[], $4::uuid[]) AS x(msg_id, lease, id)
               CROSS JOIN LATERAL (SELECT w.msg_id, w.lease FROM animus.work_items w
                                    WHERE w.id = x.id OFFSET 0) AS w
         WHERE w.msg_id = x.msg_id AND w.lease = x.lease
           AND m.msg_id = x.msg_id AND m.read_ct = x.lease
    $q$, 'q_' || p_queue) USING p_msg_ids, p_leases, p_seconds, p_ids;
    RETURN QUERY
        SELECT x.id FROM unnest(p_ids, p_msg_ids, p_leases) AS x(id, msg_id, lease)
          LEFT JOIN LATERAL (SELECT w.id, w.msg_id, w.lease, w.attempts FROM animus.work_items w
                              WHERE w.id = x.id OFFSET 0) AS w ON true
         WHERE w.id IS NULL
            OR (w.msg_id, w.lease) IS DISTINCT FROM (x.msg_id, x.lease)
            OR EXISTS (SELECT 1 FROM animus.execution_records r
                        WHERE r.work_id = x.id AND r.attempt = w.attempts
                          AND r.result = 'lost');
END
$_$;

CREATE FUNCTION animus.fail(p_id uuid, p_msg_id bigint, p_lease integer, p_error text, p_duration_ms bigint) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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

CREATE FUNCTION animus.fail_attempt(p_id uuid, p_msg_id bigint, p_lease integer, p_error text, p_duration_ms bigint, p_execution jsonb, p_usage jsonb, p_retry_delay double precision, p_reason text) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    PERFORM animus.held_item(p_id, p_msg_id, p_lease);  -- a lost lease changes nothing
    IF p_usage IS NOT NULL THEN
        PERFORM animus.add_usage(p_id, p_usage);
    END IF;
    PERFORM animus.fail(p_id, p_msg_id, p_lease, p_error, p_duration_ms);
    PERFORM animus.record_execution(p_execution);
    IF p_retry_delay IS NULL THEN
        RETURN QUERY SELECT (d.item).* FROM animus.dead_letter(p_id, p_reason) d;
    ELSE
        RETURN QUERY SELECT * FROM animus.retry(p_id, p_retry_delay, p_reason);
    END IF;
END
$$;

CREATE FUNCTION animus.held_item(p_id uuid, p_msg_id bigint, p_lease integer) RETURNS animus.work_items
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION animus.lock_item(p_id uuid) RETURNS animus.work_items
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION animus.memory_configure(p_embedder text, p_dimension integer) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
    current animus.memory_config;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('animus.memory_configure'));
    SELECT * INTO current FROM animus.memory_config;
    IF FOUND THEN
        IF current.embedder = p_embedder AND current.dimension = p_dimension THEN
            RETURN;
        END IF;
        RAISE EXCEPTION 'memories are embedded with % (% dimensions), not % (% dimensions)',
            current.embedder, current.dimension, p_embedder, p_dimension
            USING ERRCODE = 'ANI05',
                  HINT = 'configure the same embedder, or move memories with: animus memory reembed';
    END IF;
    EXECUTE format('ALTER TABLE animus.memories ALTER COLUMN embedding TYPE vector(%s)', p_dimension);
    EXECUTE 'CREATE INDEX memories_embedding ON animus.memories
             USING hnsw (embedding vector_cosine_ops)';
    INSERT INTO animus.memory_config (embedder, dimension) VALUES (p_embedder, p_dimension);
END
$$;

CREATE FUNCTION animus.notify_changed() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM animus.watchers WHERE until > now()) THEN
        PERFORM pg_notify('animus_changed', '');
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION animus.q_work_archive(p_msg_ids bigint[]) RETURNS void
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    AS $$
        BEGIN
            WITH gone AS (DELETE FROM pgmq.q_work WHERE msg_id = ANY (p_msg_ids) RETURNING msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers)
            INSERT INTO pgmq.a_work (msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers) SELECT msg_id, read_ct, enqueued_at, last_read_at, vt, message, headers FROM gone;
        END
        $$;

CREATE FUNCTION animus.q_work_claim(p_qty integer, p_work_types text[], p_vt_seconds integer, p_now timestamp with time zone, OUT msg_ids bigint[], OUT read_cts integer[], OUT ids uuid[]) RETURNS record
    LANGUAGE plpgsql
    SET enable_sort TO 'off'
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    AS $$
        BEGIN
            WITH taken AS (
                SELECT m.msg_id FROM pgmq.q_work m
                 WHERE m.vt <= p_now
                   AND (p_work_types IS NULL OR m.message->>'t' = ANY (p_work_types))
                 ORDER BY ((m.message->>'p')::int) DESC, m.vt, m.msg_id
                 LIMIT p_qty
                 FOR UPDATE SKIP LOCKED
            ), leased AS (
                UPDATE pgmq.q_work m
                   SET last_read_at = clock_timestamp(),
                       vt = clock_timestamp() + make_interval(secs => p_vt_seconds),
                       read_ct = m.read_ct + 1
                 WHERE m.msg_id = ANY (ARRAY(SELECT t.msg_id FROM taken t))
                RETURNING m.msg_id, m.read_ct, (m.message->>'id')::uuid AS id
            )
            SELECT array_agg(l.msg_id), array_agg(l.read_ct), array_agg(l.id)
              INTO msg_ids, read_cts, ids FROM leased l;
        END
        $$;

CREATE FUNCTION animus.q_work_send(p_message jsonb, p_at timestamp with time zone) RETURNS bigint
    LANGUAGE sql
    AS $$
            INSERT INTO pgmq.q_work (vt, message) VALUES (p_at, p_message) RETURNING msg_id
        $$;

CREATE FUNCTION animus.q_work_set_vt(p_msg_id bigint, p_at timestamp with time zone, p_skip_locked boolean) RETURNS text
    LANGUAGE plpgsql
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    AS $$
        BEGIN
            IF p_skip_locked THEN
                UPDATE pgmq.q_work m SET vt = p_at
                 WHERE m.msg_id = (SELECT f.msg_id FROM pgmq.q_work f WHERE f.msg_id = p_msg_id
                                      FOR UPDATE SKIP LOCKED);
                IF FOUND THEN
                    RETURN 'moved';
                END IF;
                RETURN CASE WHEN EXISTS (SELECT 1 FROM pgmq.q_work f WHERE f.msg_id = p_msg_id)
                            THEN 'held' ELSE 'missing' END;
            END IF;
            UPDATE pgmq.q_work m SET vt = p_at WHERE m.msg_id = p_msg_id;
            RETURN CASE WHEN FOUND THEN 'moved' ELSE 'missing' END;
        END
        $$;

CREATE FUNCTION animus.queue_functions(p_queue text) RETURNS void
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_q text := 'q_' || p_queue;
    v_columns text;
BEGIN
    -- the columns both tables have (they differ between versions of pgmq)
    SELECT string_agg(quote_ident(q.attname), ', ' ORDER BY q.attnum) INTO v_columns
      FROM pg_attribute q
      JOIN pg_attribute a ON a.attname = q.attname AND NOT a.attisdropped
                         AND a.attrelid = format('pgmq.%I', 'a_' || p_queue)::regclass
     WHERE q.attrelid = format('pgmq.%I', v_q)::regclass AND q.attnum > 0
       AND NOT q.attisdropped;
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_qty int, p_work_types text[],
                                               p_vt_seconds int, p_now timestamptz,
                                               OUT msg_ids bigint[], OUT read_cts int[],
                                               OUT ids uuid[])
        LANGUAGE plpgsql SET enable_sort = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $b$
        BEGIN
            WITH taken AS (
                SELECT m.msg_id FROM pgmq.%2$I m
                 WHERE m.vt <= p_now
                   AND (p_work_types IS NULL OR m.message->>'t' = ANY (p_work_types))
                 ORDER BY ((m.message->>'p')::int) DESC, m.vt, m.msg_id
                 LIMIT p_qty
                 FOR UPDATE SKIP LOCKED
            ), leased AS (
                UPDATE pgmq.%2$I m
                   SET last_read_at = clock_timestamp(),
                       vt = clock_timestamp() + make_interval(secs => p_vt_seconds),
                       read_ct = m.read_ct + 1
                 WHERE m.msg_id = ANY (ARRAY(SELECT t.msg_id FROM taken t))
                RETURNING m.msg_id, m.read_ct, (m.message->>'id')::uuid AS id
            )
            SELECT array_agg(l.msg_id), array_agg(l.read_ct), array_agg(l.id)
              INTO msg_ids, read_cts, ids FROM leased l;
        END
        $b$$f$, v_q || '_claim', v_q);
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_msg_ids bigint[]) RETURNS void
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $b$
        BEGIN
            WITH gone AS (DELETE FROM pgmq.%2$I WHERE msg_id = ANY (p_msg_ids) RETURNING %4$s)
            INSERT INTO pgmq.%3$I (%4$s) SELECT %4$s FROM gone;
        END
        $b$$f$, v_q || '_archive', v_q, 'a_' || p_queue, v_columns);
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_msg_id bigint, p_at timestamptz,
                                               p_skip_locked bool) RETURNS text
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $b$
        BEGIN
            IF p_skip_locked THEN
                UPDATE pgmq.%2$I m SET vt = p_at
                 WHERE m.msg_id = (SELECT f.msg_id FROM pgmq.%2$I f WHERE f.msg_id = p_msg_id
                                      FOR UPDATE SKIP LOCKED);
                IF FOUND THEN
                    RETURN 'moved';
                END IF;
                RETURN CASE WHEN EXISTS (SELECT 1 FROM pgmq.%2$I f WHERE f.msg_id = p_msg_id)
                            THEN 'held' ELSE 'missing' END;
            END IF;
            UPDATE pgmq.%2$I m SET vt = p_at WHERE m.msg_id = p_msg_id;
            RETURN CASE WHEN FOUND THEN 'moved' ELSE 'missing' END;
        END
        $b$$f$, v_q || '_set_vt', v_q);
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_message jsonb, p_at timestamptz) RETURNS bigint
        LANGUAGE sql AS $b$
            INSERT INTO pgmq.%2$I (vt, message) VALUES (p_at, p_message) RETURNING msg_id
        $b$$f$, v_q || '_send', v_q);
    EXECUTE format('REVOKE ALL ON FUNCTION animus.%I(int, text[], int, timestamptz) FROM PUBLIC',
                   v_q || '_claim');
    EXECUTE format('REVOKE ALL ON FUNCTION animus.%I(bigint[]) FROM PUBLIC', v_q || '_archive');
    EXECUTE format('REVOKE ALL ON FUNCTION animus.%I(bigint, timestamptz, bool) FROM PUBLIC',
                   v_q || '_set_vt');
    EXECUTE format('REVOKE ALL ON FUNCTION animus.%I(jsonb, timestamptz) FROM PUBLIC',
                   v_q || '_send');
END
$_$;

CREATE FUNCTION animus.queue_send(p_queue text, p_message jsonb, p_at timestamp with time zone) RETURNS bigint
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
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
$_$;

CREATE FUNCTION animus.queue_set_vt(p_queue text, p_msg_id bigint, p_at timestamp with time zone, p_skip_locked boolean) RETURNS text
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
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
$_$;

CREATE FUNCTION animus.record_execution(p_execution jsonb) RETURNS void
    LANGUAGE sql
    AS $$
    INSERT INTO animus.execution_records (work_id, attempt, result, work_type, params_hash,
                                          faculty, faculty_hash, engine_version,
                                          environment_hash, models, outcome_hash, error,
                                          started_at, steps)
    SELECT r.work_id, r.attempt, r.result, r.work_type, r.params_hash, r.faculty,
           r.faculty_hash, r.engine_version, r.environment_hash, r.models, r.outcome_hash,
           r.error, r.started_at, r.steps
      FROM jsonb_populate_record(NULL::animus.execution_records, p_execution) r
     WHERE p_execution IS NOT NULL
$$;

CREATE FUNCTION animus.record_step(p_id uuid, p_msg_id bigint, p_lease integer, p_position integer, p_name text, p_result jsonb, p_result_hash text, p_started_at timestamp with time zone, p_duration_ms bigint) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
    v_known text;
BEGIN
    IF v_item.state <> 'running' THEN
        RAISE EXCEPTION 'work item % is %: only a running attempt records steps',
            p_id, v_item.state USING ERRCODE = 'ANI01';
    END IF;
    SELECT s.name INTO v_known FROM animus.steps s
     WHERE s.work_id = p_id AND s.position = p_position;
    IF FOUND THEN
        RAISE EXCEPTION 'step % of work item % is recorded already (as %)',
            p_position, p_id, quote_literal(v_known) USING ERRCODE = 'ANI01';
    END IF;
    INSERT INTO animus.steps (work_id, position, name, attempt, result, result_hash,
                              started_at, duration_ms)
    VALUES (p_id, p_position, p_name, v_item.attempts, p_result, p_result_hash, p_started_at,
            p_duration_ms);
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (p_id, 'step', v_item.state, v_item.state,
            JSON_OBJECT('source': v_item.source, 'actor': animus.actor()
                        ABSENT ON NULL RETURNING jsonb),
            jsonb_build_object('position', p_position, 'name', p_name,
                               'attempt', v_item.attempts, 'result_hash', p_result_hash,
                               'duration_ms', p_duration_ms));
END
$$;

CREATE FUNCTION animus.record_steps(p_ids uuid[], p_msg_ids bigint[], p_leases integer[], p_positions integer[], p_names text[], p_results jsonb[], p_hashes text[], p_started_at timestamp with time zone[], p_durations bigint[]) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET enable_seqscan TO 'off'
    AS $$
DECLARE
    v_bad record;
    v_actor text := animus.actor();
BEGIN
    PERFORM 1 FROM (SELECT k.id FROM unnest(p_ids) AS k(id) ORDER BY k.id) AS k
         CROSS JOIN LATERAL (SELECT 1 FROM animus.work_items w WHERE w.id = k.id
                              OFFSET 0 FOR UPDATE) AS locked;
    SELECT x.* INTO v_bad
      FROM unnest(p_ids, p_msg_ids, p_leases, p_positions, p_names, p_results, p_hashes,
                  p_started_at, p_durations)
           WITH ORDINALITY AS x(id, msg_id, lease, pos, name, result, hash, started_at,
                                duration_ms, ord)
      LEFT JOIN LATERAL (SELECT w.id, w.state, w.msg_id, w.lease FROM animus.work_items w
                          WHERE w.id = x.id OFFSET 0) AS w ON true
      LEFT JOIN LATERAL (SELECT true AS recorded FROM animus.steps s
                          WHERE s.work_id = x.id AND s.position = x.pos OFFSET 0) AS s ON true
     WHERE w.id IS NULL OR w.state <> 'running'
        OR (w.msg_id, w.lease) IS DISTINCT FROM (x.msg_id, x.lease)
        OR s.recorded
     ORDER BY x.ord LIMIT 1;
    IF FOUND THEN  -- raises what record_step raises for it
        PERFORM animus.record_step(v_bad.id, v_bad.msg_id, v_bad.lease, v_bad.pos,
                                   v_bad.name, v_bad.result, v_bad.hash, v_bad.started_at,
                                   v_bad.duration_ms);
    END IF;
    INSERT INTO animus.steps (work_id, position, name, attempt, result, result_hash,
                              started_at, duration_ms)
    SELECT x.id, x.pos, x.name, w.attempts, x.result, x.hash, x.started_at, x.duration_ms
      FROM unnest(p_ids, p_positions, p_names, p_results, p_hashes, p_started_at,
                  p_durations) WITH ORDINALITY
           AS x(id, pos, name, result, hash, started_at, duration_ms, ord)
      CROSS JOIN LATERAL (SELECT w.state, w.source, w.attempts FROM animus.work_items w
                           WHERE w.id = x.id OFFSET 0) AS w
     ORDER BY x.ord;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT x.id, 'step', w.state, w.state,
           JSON_OBJECT('source': w.source, 'actor': v_actor ABSENT ON NULL RETURNING jsonb),
           jsonb_build_object('position', x.pos, 'name', x.name, 'attempt', w.attempts,
                              'result_hash', x.hash, 'duration_ms', x.duration_ms)
      FROM unnest(p_ids, p_positions, p_names, p_hashes, p_durations) WITH ORDINALITY
           AS x(id, pos, name, hash, duration_ms, ord)
      CROSS JOIN LATERAL (SELECT w.state, w.source, w.attempts FROM animus.work_items w
                           WHERE w.id = x.id OFFSET 0) AS w
     ORDER BY x.ord;
END
$$;

CREATE FUNCTION animus.refuse_change() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION '% on %.% is refused: the audit trail is append-only',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit rows can only be added; verify the chain with: animus audit verify';
END
$$;

CREATE FUNCTION animus.refuse_transition(p_id uuid, p_from animus.work_state, p_to animus.work_state) RETURNS boolean
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION 'illegal transition for work item %: % -> %', p_id, p_from, p_to
        USING ERRCODE = 'ANI01',
              HINT = 'legal transitions are listed in animus.transitions';
END
$$;

CREATE FUNCTION animus.release(p_id uuid, p_msg_id bigint, p_lease integer, p_reason text) RETURNS TABLE(was animus.work_state, item animus.work_items)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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

CREATE FUNCTION animus.requeue_message(p_item animus.work_items, p_delay double precision) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_at timestamptz := clock_timestamp() + make_interval(secs => greatest(p_delay, 0));
BEGIN
    IF p_item.msg_id IS NOT NULL
       AND animus.queue_set_vt(p_item.queue, p_item.msg_id, v_at, false) = 'moved' THEN
        RETURN;
    END IF;
    PERFORM animus.queue_send(p_item.queue, jsonb_build_object('id', p_item.id,
                                                               't', p_item.work_type,
                                                               'p', p_item.priority), v_at);
    PERFORM pg_notify('animus_work', json_build_object(
                'queue', p_item.queue, 'work_types', json_build_array(p_item.work_type))::text);
END
$$;

CREATE FUNCTION animus.require_transition(p_id uuid, p_from animus.work_state, p_to animus.work_state) RETURNS void
    LANGUAGE plpgsql
    AS $$
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

CREATE FUNCTION animus.retry(p_id uuid, p_delay double precision, p_reason text) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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
                             format('retry %s/%s', w.attempts - w.suspensions + 1,
                                    w.max_attempts))
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM animus.requeue_message(v_item, p_delay);
    RETURN NEXT v_item;
END
$$;

CREATE FUNCTION animus.scaling_depth(p_queue text DEFAULT 'work'::text, p_work_types text[] DEFAULT NULL::text[]) RETURNS bigint
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $_$
DECLARE
    v_ready bigint;
    v_held bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        RAISE EXCEPTION 'animus.scaling_depth: there is no queue %', quote_literal(p_queue)
            USING ERRCODE = '22023',
                  HINT = 'name a queue engines serve: work, unless they run with --queue';
    END IF;
    EXECUTE format('SELECT count(*) FROM pgmq.%I WHERE vt <= clock_timestamp() '
                   'AND ($1::text[] IS NULL OR message->>''t'' = ANY ($1))', 'q_' || p_queue)
       INTO v_ready USING p_work_types;
    SELECT count(*) INTO v_held
      FROM animus.work_items w
     WHERE w.state IN ('claimed', 'running') AND w.queue = p_queue
       AND (p_work_types IS NULL OR w.work_type = ANY (p_work_types));
    RETURN v_ready + v_held;
END
$_$;

CREATE FUNCTION animus.signal(p_id uuid, p_event text, p_payload jsonb) RETURNS TABLE(signal_id bigint, woke boolean)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_id);
    v_wakes bool;
    v_signal bigint;
BEGIN
    IF v_item.state IN ('completed', 'dead', 'merged', 'cancelled') THEN
        RAISE EXCEPTION 'work item % is %: a finished item takes no signals', p_id, v_item.state
            USING ERRCODE = 'ANI01';
    END IF;
    v_wakes := v_item.state = 'waiting' AND v_item.wait->>'kind' = 'event'
               AND v_item.wait->>'event' = p_event;
    INSERT INTO animus.signals (work_id, event, payload, consumed_by_position, consumed_at)
    VALUES (p_id, p_event, p_payload,
            CASE WHEN v_wakes THEN (v_item.wait->>'position')::int END,
            CASE WHEN v_wakes THEN now() END)
    RETURNING id INTO v_signal;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (p_id, 'signal', v_item.state, v_item.state,
            JSON_OBJECT('source': v_item.source, 'actor': animus.actor()
                        ABSENT ON NULL RETURNING jsonb),
            jsonb_build_object('signal', v_signal, 'event', p_event, 'sent_by', session_user));
    IF v_wakes THEN
        UPDATE animus.work_items w
           SET state = 'queued', updated_at = now(),
               reason = format('woken: signal %s arrived', quote_literal(p_event))
         WHERE w.id = p_id RETURNING w.* INTO v_item;
        PERFORM animus.wake_message(v_item);
        RETURN QUERY SELECT v_signal, true;
    ELSE
        RETURN QUERY SELECT v_signal, false;
    END IF;
END
$$;

CREATE FUNCTION animus.signal_many(p_ids uuid[], p_events text[], p_payloads jsonb[]) RETURNS TABLE(signal_id bigint, woke boolean, error text)
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    SET enable_seqscan TO 'off'
    AS $_$
DECLARE
    v_n int := coalesce(cardinality(p_ids), 0);
    v_sent int[];        -- positions (1-based) of the signals sent, in order
    v_wakes int[];       -- positions of those that wake their item
    v_ids bigint[];      -- the ids of the signals sent, in the order of v_sent
    v_actor text := animus.actor();
    v_woken uuid[];      -- the items woken, with their queue, type, priority and message
    v_queues text[];
    v_types text[];
    v_priorities int[];
    v_msgs bigint[];
    q record;
    v_gone jsonb[];
BEGIN
    IF coalesce(cardinality(p_events), 0) <> v_n OR coalesce(cardinality(p_payloads), 0) <> v_n
    THEN
        RAISE EXCEPTION 'signal_many takes as many events and payloads as work ids: got % ids, '
                        '% events and % payloads', v_n, coalesce(cardinality(p_events), 0),
                        coalesce(cardinality(p_payloads), 0)
            USING ERRCODE = '22023';
    END IF;
    IF v_n = 0 THEN
        RETURN;
    END IF;
    PERFORM 1 FROM (SELECT k.id FROM unnest(p_ids) AS k(id) ORDER BY k.id) AS k
         CROSS JOIN LATERAL (SELECT 1 FROM animus.work_items w WHERE w.id = k.id
                              OFFSET 0 FOR UPDATE) AS locked;

    -- What each signal does, as if sent one after the other: an item waiting for an event
    -- is woken by the first signal of that event in the batch; later ones find it queued.
    SELECT array_agg(b.ord ORDER BY b.ord) FILTER (WHERE b.sent),
           array_agg(b.ord ORDER BY b.ord) FILTER (WHERE b.ord = b.waker)
      INTO v_sent, v_wakes
      FROM (SELECT s.ord,
                   w.state IS NOT NULL
                   AND w.state NOT IN ('completed', 'dead', 'merged', 'cancelled') AS sent,
                   CASE WHEN w.state = 'waiting' AND w.wait->>'kind' = 'event' THEN
                        min(s.ord) FILTER (WHERE s.event = w.wait->>'event')
                            OVER (PARTITION BY s.id) END AS waker
              FROM unnest(p_ids, p_events) WITH ORDINALITY AS s(id, event, ord)
              LEFT JOIN LATERAL (SELECT w.state, w.wait FROM animus.work_items w
                                  WHERE w.id = s.id OFFSET 0) AS w ON true) b;

    -- The signals, in the batch's order (so the first of an item's signals is taken first)
    WITH ins AS (
        INSERT INTO animus.signals (work_id, event, payload, consumed_by_position,
                                    consumed_at)
        SELECT p_ids[s.o], p_events[s.o], p_payloads[s.o],
               CASE WHEN k.ord IS NOT NULL THEN (w.wait->>'position')::int END,
               CASE WHEN k.ord IS NOT NULL THEN now() END
          FROM unnest(v_sent) AS s(o)
          LEFT JOIN unnest(v_wakes) AS k(ord) ON k.ord = s.o
          LEFT JOIN LATERAL (SELECT w.wait FROM animus.work_items w
                              WHERE k.ord IS NOT NULL AND w.id = p_ids[s.o] OFFSET 0) AS w
            ON true
         ORDER BY s.o
        RETURNING id)
    SELECT array_agg(id ORDER BY id) INTO v_ids FROM ins;

    -- Audited as animus.signal audits them, each with the state its item has when it
    -- arrives: the signals up to (and including) the one that wakes their item first, then
    -- the `woken` rows (the trigger writes them), then the signals that arrive after.
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT w.id, 'signal', w.state, w.state,
           JSON_OBJECT('source': w.source, 'actor': v_actor ABSENT ON NULL RETURNING jsonb),
           jsonb_build_object('signal', x.signal_id, 'event', p_events[x.ord],
                              'sent_by', session_user)
      FROM unnest(v_sent, v_ids) AS x(ord, signal_id)
      CROSS JOIN LATERAL (SELECT w.id, w.state, w.source FROM animus.work_items w
                           WHERE w.id = p_ids[x.ord] OFFSET 0) AS w
     WHERE NOT EXISTS (SELECT 1 FROM unnest(v_wakes) AS k(ord)
                        WHERE p_ids[k.ord] = w.id AND k.ord < x.ord)
     ORDER BY x.ord;

    IF v_wakes IS NOT NULL THEN
        PERFORM animus.audit_by_statement(cardinality(v_wakes));
        WITH woken AS (
            UPDATE animus.work_items w
               SET state = 'queued', updated_at = now(),
                   reason = format('woken: signal %s arrived', quote_literal(p_events[k.ord]))
              FROM unnest(v_wakes) AS k(ord)
                   CROSS JOIN LATERAL (SELECT i.ctid FROM animus.work_items i
                                        WHERE i.id = p_ids[k.ord] OFFSET 0) AS found
             WHERE w.ctid = found.ctid
            RETURNING w.id, w.queue, w.work_type, w.priority, w.msg_id)
        SELECT array_agg(id), array_agg(queue), array_agg(work_type), array_agg(priority),
               array_agg(msg_id)
          INTO v_woken, v_queues, v_types, v_priorities, v_msgs
          FROM woken;
        PERFORM animus.audit_by_statement(0);
        FOR q IN
            SELECT x.queue, array_agg(x.id) AS ids, array_agg(x.t) AS types,
                   array_agg(x.p) AS priorities, array_agg(x.msg) AS msgs
              FROM unnest(v_woken, v_queues, v_types, v_priorities, v_msgs)
                   AS x(id, queue, t, p, msg)
             GROUP BY x.queue
        LOOP
            -- As animus.wake_message, per queue: a message nobody holds is made visible now;
            -- one a claim holds (the item's timer ran out this very moment) is left to that
            -- claim, which delivers the item itself; an item whose message is gone gets a
            -- new one.
            EXECUTE format($f$
                WITH free AS (
                    SELECT m.msg_id FROM pgmq.%1$I m WHERE m.msg_id = ANY ($1)
                       FOR UPDATE SKIP LOCKED)
                UPDATE pgmq.%1$I m SET vt = clock_timestamp()
                  FROM free WHERE m.msg_id = free.msg_id
            $f$, 'q_' || q.queue) USING q.msgs;
            EXECUTE format($f$
                SELECT array_agg(jsonb_build_object('id', x.id, 't', x.t, 'p', x.p))
                  FROM unnest($1::uuid[], $2::text[], $3::int[], $4::bigint[]) AS x(id, t, p, msg)
                 WHERE x.msg IS NULL
                    OR NOT EXISTS (SELECT 1 FROM pgmq.%1$I m WHERE m.msg_id = x.msg)
            $f$, 'q_' || q.queue) INTO v_gone USING q.ids, q.types, q.priorities, q.msgs;
            IF v_gone IS NOT NULL THEN
                PERFORM pgmq.send_batch(q.queue, v_gone, clock_timestamp());
            END IF;
            PERFORM pg_notify('animus_work', json_build_object(
                        'queue', q.queue, 'work_types', json_build_array(t.work_type))::text)
               FROM (SELECT DISTINCT unnest(q.types) AS work_type ORDER BY 1) t;
        END LOOP;

        INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance,
                                      payload)
        SELECT w.id, 'signal', w.state, w.state,
               JSON_OBJECT('source': w.source, 'actor': v_actor ABSENT ON NULL RETURNING jsonb),
               jsonb_build_object('signal', x.signal_id, 'event', p_events[x.ord],
                                  'sent_by', session_user)
          FROM unnest(v_sent, v_ids) AS x(ord, signal_id)
          CROSS JOIN LATERAL (SELECT w.id, w.state, w.source FROM animus.work_items w
                               WHERE w.id = p_ids[x.ord] OFFSET 0) AS w
         WHERE EXISTS (SELECT 1 FROM unnest(v_wakes) AS k(ord)
                        WHERE p_ids[k.ord] = w.id AND k.ord < x.ord)
         ORDER BY x.ord;
    END IF;

    RETURN QUERY
        SELECT x.signal_id, x.signal_id IS NOT NULL AND b.ord = ANY (coalesce(v_wakes, '{}')),
               CASE WHEN x.signal_id IS NOT NULL THEN NULL
                    WHEN w.id IS NULL THEN format('no work item with id %s', b.id)
                    ELSE format('work item %s is %s: a finished item takes no signals',
                                b.id, w.state) END
          FROM unnest(p_ids) WITH ORDINALITY AS b(id, ord)
          LEFT JOIN unnest(v_sent, v_ids) AS x(ord, signal_id) ON x.ord = b.ord
          LEFT JOIN LATERAL (SELECT w.id, w.state FROM animus.work_items w
                              WHERE w.id = b.id OFFSET 0) AS w ON true
         ORDER BY b.ord;
END
$_$;

CREATE FUNCTION animus.start(p_id uuid, p_msg_id bigint, p_lease integer) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
BEGIN
    PERFORM animus.require_transition(p_id, v_item.state, 'running');
    RETURN QUERY UPDATE animus.work_items w
                    SET state = 'running', attempts = w.attempts + 1, updated_at = now()
                  WHERE w.id = p_id RETURNING w.*;
END
$$;

CREATE FUNCTION animus.status_view(p_dead integer, p_waiting integer) RETURNS jsonb
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_queues jsonb := '[]';
    q record;
    v_depth bigint;
    v_oldest int;
BEGIN
    FOR q IN SELECT queue_name FROM pgmq.meta ORDER BY queue_name LOOP
        EXECUTE format('SELECT count(*), extract(epoch FROM now() - min(enqueued_at))::int
                          FROM pgmq.%I', 'q_' || q.queue_name) INTO v_depth, v_oldest;
        v_queues := v_queues || jsonb_build_object('queue', q.queue_name, 'depth', v_depth,
                                                   'oldest_seconds', v_oldest);
    END LOOP;
    RETURN jsonb_build_object(
        'now', now(),
        'engines', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'id', e.id, 'host', e.host, 'pid', e.pid, 'version', e.version,
                       'db_user', e.db_user, 'started_at', e.started_at,
                       'last_seen', e.last_seen, 'heartbeat_seconds', e.heartbeat_seconds,
                       'lost', animus.engine_lost(e), 'concurrency', e.concurrency,
                       'queues', to_jsonb(e.queues), 'faculties', e.faculties,
                       'disabled', e.disabled, 'running', e.running,
                       'schedules', e.schedules,
                       'stop_requested_at', e.stop_requested_at,
                       'stop_requested_by', e.stop_requested_by)
                   ORDER BY e.started_at, e.id)
              FROM animus.engines e), '[]'),
        'queues', v_queues,
        'work', coalesce((
            SELECT jsonb_agg(jsonb_build_object('work_type', c.work_type, 'state', c.state,
                                                'n', c.n, 'oldest', c.oldest)
                             ORDER BY c.work_type, c.state)
              FROM (SELECT work_type, state::text AS state, count(*) AS n,
                           min(created_at) AS oldest
                      FROM animus.work_items
                     WHERE state NOT IN ('completed', 'merged', 'cancelled')
                     GROUP BY 1, 2) c), '[]'),
        'dead', coalesce((
            SELECT jsonb_agg(jsonb_build_object('id', d.id, 'work_type', d.work_type,
                                                'reason', d.reason,
                                                'resolved_at', d.resolved_at)
                             ORDER BY d.resolved_at DESC)
              FROM (SELECT id, work_type, reason, resolved_at FROM animus.work_items
                     WHERE state = 'dead' ORDER BY resolved_at DESC
                     LIMIT p_dead) d), '[]'),
        'waiting', coalesce((
            SELECT jsonb_agg(jsonb_build_object('kind', k.kind, 'n', k.n,
                                                'next_wake_at', k.next_wake_at)
                             ORDER BY k.kind)
              FROM (SELECT coalesce(wait->>'kind', '?') AS kind, count(*) AS n,
                           min(wake_at) AS next_wake_at
                      FROM animus.work_items WHERE state = 'waiting' GROUP BY 1) k), '[]'),
        'next_waking', coalesce((
            SELECT jsonb_agg(jsonb_build_object('id', w.id, 'work_type', w.work_type,
                                                'wait', w.wait, 'wake_at', w.wake_at,
                                                'reason', w.reason)
                             ORDER BY w.wake_at, w.id)
              FROM (SELECT id, work_type, wait, wake_at, reason
                      FROM animus.work_items WHERE state = 'waiting'
                     ORDER BY wake_at, id LIMIT p_waiting) w), '[]'),
        'schedules', coalesce((
            SELECT jsonb_agg(jsonb_build_object('name', t.name, 'last_tick', t.tick,
                                                'work_type', w.work_type) ORDER BY t.name)
              FROM (SELECT DISTINCT ON (name) name, tick, work_id FROM animus.schedule_ticks
                     ORDER BY name, tick DESC) t
              LEFT JOIN animus.work_items w ON w.id = t.work_id), '[]'));
END
$$;

CREATE FUNCTION animus.stop_engines(p_engine uuid, p_grace double precision) RETURNS SETOF uuid
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_ids uuid[];
BEGIN
    IF p_grace IS NOT NULL AND NOT (p_grace >= 0 AND p_grace <= 86400) THEN
        RAISE EXCEPTION 'a grace period is from 0 to 86400 seconds, got %', p_grace
            USING ERRCODE = '22023';
    END IF;
    IF p_engine IS NOT NULL AND NOT EXISTS (SELECT 1 FROM animus.engines WHERE id = p_engine)
    THEN
        RAISE EXCEPTION 'no engine with id % is registered (animus status lists them)',
            p_engine USING ERRCODE = 'ANI04';
    END IF;
    WITH asked AS (
        UPDATE animus.engines e
           SET stop_requested_at = now(), stop_requested_by = session_user,
               stop_grace = p_grace
         WHERE (p_engine IS NULL OR e.id = p_engine) AND NOT animus.engine_lost(e)
        RETURNING e.id)
    SELECT array_agg(id ORDER BY id) INTO v_ids FROM asked;
    PERFORM pg_notify('animus_engines', x::text) FROM unnest(v_ids) AS x;
    RETURN QUERY SELECT unnest(coalesce(v_ids, '{}'));
END
$$;

CREATE FUNCTION animus.submission_items(p_items jsonb) RETURNS TABLE(ord bigint, work_type text, dedup_key text, params jsonb, source text, trigger text, priority integer, parent_id uuid, replay_of uuid, max_attempts integer, traceparent text, state animus.work_state, reason text, gate jsonb)
    LANGUAGE sql STABLE
    AS $$
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

CREATE FUNCTION animus.submit(p_queue text, p_items jsonb) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
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

CREATE FUNCTION animus.suspend(p_id uuid, p_msg_id bigint, p_lease integer, p_wait jsonb, p_wake_at timestamp with time zone, p_duration_ms bigint, p_execution jsonb) RETURNS SETOF animus.work_items
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_item animus.work_items;
    v_event text := quote_literal(coalesce(p_wait->>'event', '?'));
    v_kind text := p_wait->>'kind';
    v_children text;
    v_woken text;
BEGIN
    IF jsonb_typeof(p_wait) IS DISTINCT FROM 'object'
       OR v_kind IS NULL OR v_kind NOT IN ('sleep', 'event', 'approval', 'children')
       OR (v_kind = 'sleep' AND p_wake_at IS NULL)
       OR (v_kind = 'children' AND (jsonb_typeof(p_wait->'children') IS DISTINCT FROM 'array'
                                    OR jsonb_array_length(p_wait->'children') = 0)) THEN
        RAISE EXCEPTION 'work item %: a wait is {"kind": "sleep" (with a wake time), '
                        '"event", "approval" or "children" (with the ids of the children), '
                        '...}, got %', p_id, coalesce(p_wait::text, 'null')
            USING ERRCODE = 'ANI01';
    END IF;
    IF v_kind = 'children' THEN
        v_children := animus.children_text(p_wait);
        -- Its children (and the items they were merged into) are locked before the item:
        -- a child being finished now is waited for, and one finished after this suspension
        -- commits sees the item waiting. (The other way round would deadlock with a child
        -- whose finish checks its parent key, a row it updated twice.)
        PERFORM 1 FROM animus.work_items w
         WHERE w.id IN (SELECT c.id::uuid FROM jsonb_array_elements_text(p_wait->'children') c(id)
                        UNION
                        SELECT k.merged_into FROM animus.work_items k
                         WHERE k.id IN (SELECT c.id::uuid
                                          FROM jsonb_array_elements_text(p_wait->'children') c(id))
                           AND k.merged_into IS NOT NULL)
         ORDER BY w.id
           FOR SHARE OF w;
    END IF;
    v_item := animus.held_item(p_id, p_msg_id, p_lease);
    PERFORM animus.require_transition(p_id, v_item.state, 'waiting');
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
                         WHEN v_kind = 'children'
                         THEN format('waiting for %s', v_children)
                              || coalesce(' until ' || (p_wait->>'until'), '')
                         WHEN p_wake_at IS NULL THEN format('waiting for %s', v_event)
                         ELSE format('waiting for %s until %s', v_event, p_wait->>'until') END
     WHERE w.id = p_id RETURNING w.* INTO v_item;
    PERFORM animus.record_execution(p_execution);
    IF v_kind = 'event' THEN
        -- a signal that arrived before the wait (the first not taken): the wait takes it
        -- and the item is woken at once
        UPDATE animus.signals s SET consumed_by_position = (p_wait->>'position')::int,
                                    consumed_at = now()
         WHERE s.id = (SELECT f.id FROM animus.signals f
                        WHERE f.work_id = p_id AND f.event = p_wait->>'event'
                          AND f.consumed_by_position IS NULL
                        ORDER BY f.id + 0 LIMIT 1);
        IF FOUND THEN
            v_woken := format('woken: signal %s had arrived', v_event);
        END IF;
    ELSIF v_kind = 'children' AND NOT animus.children_unfinished(p_wait) THEN
        -- they finished after the attempt last looked: woken at once
        v_woken := format('woken: its %s had finished', v_children);
    END IF;
    IF v_woken IS NOT NULL THEN
        UPDATE animus.work_items w
           SET state = 'queued', updated_at = now(), reason = v_woken
         WHERE w.id = p_id RETURNING w.* INTO v_item;
        PERFORM animus.wake_message(v_item);
        RETURN NEXT v_item;
        RETURN;
    END IF;
    PERFORM animus.queue_set_vt(v_item.queue, p_msg_id, coalesce(p_wake_at, 'infinity'), false);
    PERFORM pg_notify('animus_work', json_build_object(
                'queue', v_item.queue, 'work_types', json_build_array(v_item.work_type),
                'wake_at', p_wake_at)::text);
    RETURN NEXT v_item;
END
$$;

CREATE FUNCTION animus.take_queued(p_ids uuid[], p_msgs bigint[], p_reads integer[], p_only uuid[], p_start boolean) RETURNS SETOF animus.work_items
    LANGUAGE sql
    SET plan_cache_mode TO 'force_generic_plan'
    SET enable_seqscan TO 'off'
    SET enable_memoize TO 'off'
    AS $$
    WITH claimed AS (
        UPDATE animus.work_items w
           SET state = CASE WHEN p_start THEN 'running' ELSE 'claimed' END::animus.work_state,
               attempts = w.attempts + CASE WHEN p_start THEN 1 ELSE 0 END,
               msg_id = c.msg_id, lease = c.read_ct, reason = NULL, updated_at = now()
          FROM unnest(p_ids, p_msgs, p_reads) AS c(id, msg_id, read_ct)
               CROSS JOIN LATERAL (SELECT i.ctid FROM animus.work_items i
                                    WHERE i.id = c.id OFFSET 0) AS found
         WHERE w.ctid = found.ctid AND w.state::text = 'queued'
           AND (p_only IS NULL OR c.id = ANY (p_only))
        RETURNING w.*)
    SELECT * FROM claimed ORDER BY priority DESC, msg_id
$$;

CREATE TABLE animus.signals (
    id bigint NOT NULL,
    work_id uuid NOT NULL,
    event text NOT NULL,
    payload jsonb,
    sent_by text DEFAULT SESSION_USER NOT NULL,
    sent_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    consumed_by_position integer,
    consumed_at timestamp with time zone,
    CONSTRAINT signals_event_check CHECK ((event <> ''::text))
);

CREATE FUNCTION animus.take_signal(p_id uuid, p_msg_id bigint, p_lease integer, p_event text, p_position integer) RETURNS SETOF animus.signals
    LANGUAGE plpgsql SECURITY DEFINER
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
DECLARE
    v_item animus.work_items;
    v_signal animus.signals;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM animus.signals s
                    WHERE s.work_id = p_id AND s.event = p_event
                      AND (s.consumed_by_position IS NULL
                           OR s.consumed_by_position = p_position)) THEN
        RETURN;
    END IF;
    v_item := animus.held_item(p_id, p_msg_id, p_lease);
    IF v_item.state <> 'running' THEN
        RAISE EXCEPTION 'work item % is %: only a running attempt takes signals',
            p_id, v_item.state USING ERRCODE = 'ANI01';
    END IF;
    SELECT * INTO v_signal FROM animus.signals s
     WHERE s.work_id = p_id AND s.event = p_event AND s.consumed_by_position = p_position;
    IF FOUND THEN
        RETURN NEXT v_signal;
        RETURN;
    END IF;
    RETURN QUERY
        UPDATE animus.signals s SET consumed_by_position = p_position, consumed_at = now()
         WHERE s.id = (SELECT f.id FROM animus.signals f
                        WHERE f.work_id = p_id AND f.event = p_event
                          AND f.consumed_by_position IS NULL
                        ORDER BY f.id + 0 LIMIT 1)
        RETURNING s.*;
END
$$;

CREATE FUNCTION animus.timer_woke(p_wait jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE
    AS $$
    SELECT CASE p_wait->>'kind'
               WHEN 'sleep' THEN format('woken: sleep until %s ended', p_wait->>'until')
               WHEN 'approval' THEN format('woken: approval (%s x %s) timed out undecided',
                                          p_wait->>'quorum', p_wait->>'role')
               WHEN 'children' THEN format('woken: wait for %s timed out',
                                          animus.children_text(p_wait))
               ELSE format('woken: wait for %s timed out',
                           quote_literal(coalesce(p_wait->>'event', '?'))) END
$$;

CREATE FUNCTION animus.wake_message(p_item animus.work_items) RETURNS void
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_moved text;
BEGIN
    IF p_item.msg_id IS NOT NULL THEN
        v_moved := animus.queue_set_vt(p_item.queue, p_item.msg_id, clock_timestamp(), true);
        IF v_moved = 'moved' THEN
            PERFORM pg_notify('animus_work', json_build_object(
                        'queue', p_item.queue,
                        'work_types', json_build_array(p_item.work_type))::text);
            RETURN;
        ELSIF v_moved = 'held' THEN  -- an engine is claiming it: the claim finds the item queued
            RETURN;
        END IF;
    END IF;
    PERFORM animus.requeue_message(p_item, 0);  -- no message left: a new one
END
$$;

CREATE FUNCTION animus.watch(p_name text, p_seconds integer) RETURNS void
    LANGUAGE sql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
    DELETE FROM animus.watchers WHERE until <= now() OR (name = p_name AND p_seconds <= 0);
    INSERT INTO animus.watchers (name, until)
    SELECT p_name, now() + make_interval(secs => p_seconds) WHERE p_seconds > 0
        ON CONFLICT (name) DO UPDATE SET until = EXCLUDED.until;
$$;

CREATE FUNCTION animus.work_item_updated() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_provenance jsonb := JSON_OBJECT('source': NEW.source, 'trigger': NEW.trigger,
                                      'actor': animus.actor() ABSENT ON NULL RETURNING jsonb);
    v_from animus.work_state := OLD.state;
    v_columns jsonb;
BEGIN
    IF OLD.state IS DISTINCT FROM NEW.state THEN
        IF OLD.state = 'queued' AND NEW.state = 'running'
           AND (NEW.msg_id, NEW.lease) IS DISTINCT FROM (OLD.msg_id, OLD.lease) THEN
            -- a claim that starts its focus: queued -> claimed, then claimed -> running
            INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance,
                                          payload)
            VALUES (NEW.id, 'claimed', 'queued', 'claimed', v_provenance,
                    JSON_OBJECT('reason': NEW.reason, 'attempts': OLD.attempts
                                ABSENT ON NULL RETURNING jsonb));
            v_from := 'claimed';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM animus.transitions t
                        WHERE t.from_state = v_from AND t.to_state = NEW.state) THEN
            PERFORM animus.refuse_transition(NEW.id, v_from, NEW.state);
        END IF;
        INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
        VALUES (NEW.id,
                CASE WHEN v_from = 'running' AND NEW.state = 'waiting' THEN 'suspended'
                     WHEN v_from = 'waiting' AND NEW.state = 'queued' THEN 'woken'
                     ELSE NEW.state::text END,
                v_from, NEW.state, v_provenance,
                JSON_OBJECT('reason': NEW.reason, 'attempts': NEW.attempts,
                            'error': CASE WHEN NEW.state IN ('failed', 'dead')
                                          THEN NEW.outcome_error END,
                            'outcome': CASE WHEN NEW.state = 'completed'
                                            THEN NEW.outcome_data END,
                            'duration_ms': CASE WHEN NEW.state IN ('completed', 'failed',
                                                                   'waiting')
                                                THEN NEW.duration_ms END,
                            'wait': CASE WHEN NEW.state = 'waiting' THEN NEW.wait END,
                            'wake_at': CASE WHEN NEW.state = 'waiting' THEN NEW.wake_at END,
                            'suspensions': CASE WHEN NEW.state = 'waiting'
                                                THEN NEW.suspensions END
                            ABSENT ON NULL RETURNING jsonb));
        IF (OLD.work_type, OLD.dedup_key, OLD.params, OLD.source, OLD.trigger, OLD.priority,
            OLD.queue, OLD.parent_id, OLD.merged_into, OLD.replay_of, OLD.traceparent, OLD.gate,
            OLD.max_attempts, OLD.created_at, OLD.usage, OLD.cancel_requested)
           IS NOT DISTINCT FROM
           (NEW.work_type, NEW.dedup_key, NEW.params, NEW.source, NEW.trigger, NEW.priority,
            NEW.queue, NEW.parent_id, NEW.merged_into, NEW.replay_of, NEW.traceparent, NEW.gate,
            NEW.max_attempts, NEW.created_at, NEW.usage, NEW.cancel_requested) THEN
            RETURN NULL;  -- a move of the state machine, and nothing else
        END IF;
    END IF;

    -- A change of anything else is audited as `changed`, with each column's old and new value
    -- (a move's own columns left out), unless an approval or a cancel request audited it already.
    SELECT jsonb_object_agg(nc.key, jsonb_build_object('old', oc.value, 'new', nc.value))
      INTO v_columns
      FROM jsonb_each(to_jsonb(NEW)) AS nc
      JOIN jsonb_each(to_jsonb(OLD)) AS oc ON oc.key = nc.key
     WHERE nc.value IS DISTINCT FROM oc.value
       AND nc.key <> ALL (CASE WHEN OLD.state = NEW.state THEN ARRAY['updated_at']
                               ELSE ARRAY['state', 'reason', 'attempts', 'outcome_data',
                                          'outcome_error', 'duration_ms', 'msg_id', 'lease',
                                          'resolved_at', 'updated_at', 'wait', 'wake_at',
                                          'suspensions'] END);
    IF v_columns IS NULL
       OR (OLD.state = NEW.state AND EXISTS (
               SELECT 1 FROM animus.audit_log a
                WHERE a.work_id = NEW.id AND a.at = now() AND a.db_user = session_user
                  AND CASE a.event
                          WHEN 'approval' THEN v_columns - 'reason' = '{}'
                          WHEN 'cancel_requested' THEN v_columns - 'cancel_requested' = '{}'
                          ELSE false END)) THEN
        RETURN NULL;
    END IF;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (NEW.id, 'changed', NEW.state, NEW.state, v_provenance,
            jsonb_build_object('columns', v_columns));
    RETURN NULL;
END
$$;

CREATE FUNCTION animus.work_item_wake_parents() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_parent animus.work_items;
BEGIN
    FOR v_parent IN
        SELECT p.* FROM animus.work_items p
         WHERE p.id IN (SELECT NEW.parent_id
                        UNION
                        SELECT m.parent_id FROM animus.work_items m
                         WHERE m.merged_into = NEW.id AND m.parent_id IS NOT NULL)
           AND p.state = 'waiting' AND p.wait->>'kind' = 'children'
         ORDER BY p.id
           FOR NO KEY UPDATE OF p
    LOOP
        IF NOT animus.children_unfinished(v_parent.wait) THEN
            UPDATE animus.work_items w
               SET state = 'queued', updated_at = now(),
                   reason = format('woken: its %s finished', animus.children_text(w.wait))
             WHERE w.id = v_parent.id RETURNING w.* INTO v_parent;
            PERFORM animus.wake_message(v_parent);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE FUNCTION animus.work_items_inserted() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    bad record;
    v_actor text := animus.actor();
BEGIN
    SELECT id, state INTO bad FROM new_rows
     WHERE state NOT IN ('created', 'queued', 'merged', 'awaiting_approval', 'dead') LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'illegal transition for work item %: a new item cannot start in state %',
            bad.id, bad.state
            USING ERRCODE = 'ANI01',
                  HINT = 'a new item starts in one of: created, queued, merged, awaiting_approval, dead';
    END IF;

    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id,
           CASE n.state WHEN 'merged' THEN 'merged' ELSE 'submitted' END,
           NULL, n.state,
           JSON_OBJECT('source': n.source, 'trigger': n.trigger, 'actor': v_actor
                       ABSENT ON NULL RETURNING jsonb),
           JSON_OBJECT('work_type': n.work_type, 'dedup_key': n.dedup_key, 'params': n.params,
                       'priority': n.priority, 'queue': n.queue, 'parent_id': n.parent_id,
                       'merged_into': n.merged_into, 'replay_of': n.replay_of,
                       'max_attempts': n.max_attempts, 'reason': n.reason,
                       'gate': n.gate
                       ABSENT ON NULL RETURNING jsonb)
      FROM new_rows n ORDER BY n.created_at, n.id;

    PERFORM pg_notify('animus_work', json_build_object(
                'queue', q.queue, 'work_types', q.types)::text)
       FROM (SELECT queue, array_agg(DISTINCT work_type ORDER BY work_type) AS types
               FROM new_rows WHERE state = 'queued' GROUP BY queue) q;
    RETURN NULL;
END
$$;

CREATE FUNCTION animus.work_items_left_waiting() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    NEW.wake_at := NULL;
    RETURN NEW;
END
$$;

CREATE FUNCTION animus.work_items_refuse_delete() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    IF OLD.state NOT IN ('completed', 'dead', 'merged', 'cancelled') THEN
        RAISE EXCEPTION 'work item % is %: only finished work can be deleted', OLD.id, OLD.state
            USING ERRCODE = 'ANI01';
    END IF;
    RETURN OLD;
END
$$;

CREATE FUNCTION animus.work_items_refuse_rewrite() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    RAISE EXCEPTION '% of work item % cannot change',
        CASE WHEN OLD.id IS DISTINCT FROM NEW.id THEN 'the id' ELSE 'requested_by' END, OLD.id
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'requested_by is the database user who submitted the item';
END
$$;

CREATE FUNCTION animus.work_items_session_user() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
BEGIN
    NEW.requested_by := session_user;
    RETURN NEW;
END
$$;

CREATE FUNCTION animus.work_items_updated() RETURNS trigger
    LANGUAGE plpgsql
    AS $$
DECLARE
    v_actor text := animus.actor();
    v_finished uuid[];
    v_parent animus.work_items;
BEGIN
    WITH audited AS (
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id,
           CASE WHEN s.from_state = 'running' AND s.to_state = 'waiting' THEN 'suspended'
                WHEN s.from_state = 'waiting' AND s.to_state = 'queued' THEN 'woken'
                ELSE s.to_state::text END,
           s.from_state, s.to_state,
           JSON_OBJECT('source': n.source, 'trigger': n.trigger, 'actor': v_actor
                       ABSENT ON NULL RETURNING jsonb),
           JSON_OBJECT('reason': n.reason, 'attempts': s.attempts,
                       'error': CASE WHEN n.state IN ('failed', 'dead') THEN n.outcome_error END,
                       'outcome': CASE WHEN n.state = 'completed' THEN n.outcome_data END,
                       'duration_ms': CASE WHEN n.state IN ('completed', 'failed', 'waiting')
                                           THEN n.duration_ms END,
                       'wait': CASE WHEN n.state = 'waiting' THEN n.wait END,
                       'wake_at': CASE WHEN n.state = 'waiting' THEN n.wake_at END,
                       'suspensions': CASE WHEN n.state = 'waiting' THEN n.suspensions END
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
     ORDER BY n.id, steps.step
    RETURNING work_id, from_state, to_state)
    SELECT array_agg(a.work_id) INTO v_finished FROM audited a
     WHERE a.to_state IN ('completed', 'dead', 'cancelled')
       AND a.from_state NOT IN ('completed', 'dead', 'cancelled');

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
                                               'lease', 'resolved_at', 'updated_at', 'wait',
                                               'wake_at', 'suspensions'] END)) c
     WHERE c.columns IS NOT NULL
       AND NOT (o.state = n.state AND EXISTS (
               SELECT 1 FROM animus.audit_log a
                WHERE a.work_id = n.id AND a.at = now() AND a.db_user = session_user
                  AND CASE a.event
                          WHEN 'approval' THEN c.columns - 'reason' = '{}'
                          WHEN 'cancel_requested' THEN c.columns - 'cancel_requested' = '{}'
                          ELSE false END))
     ORDER BY n.id;

    -- The items that finished: wake each parent waiting for children none of which is
    -- unfinished any more (the item's own parent, and the parents of items merged into it),
    -- as work_items_wake_parents did in a trigger of its own (0020).
    IF v_finished IS NULL THEN
        RETURN NULL;
    END IF;
    FOR v_parent IN
        SELECT p.* FROM animus.work_items p
         WHERE p.id IN (SELECT n.parent_id FROM new_rows n
                         WHERE n.id = ANY (v_finished) AND n.parent_id IS NOT NULL
                        UNION
                        SELECT m.parent_id FROM animus.work_items m
                         WHERE m.merged_into = ANY (v_finished) AND m.parent_id IS NOT NULL)
           AND p.state = 'waiting' AND p.wait->>'kind' = 'children'
         ORDER BY p.id
           FOR NO KEY UPDATE OF p
    LOOP
        -- a statement of its own: it sees the siblings finished by whoever held the lock
        IF NOT animus.children_unfinished(v_parent.wait) THEN
            UPDATE animus.work_items w
               SET state = 'queued', updated_at = now(),
                   reason = format('woken: its %s finished', animus.children_text(w.wait))
             WHERE w.id = v_parent.id RETURNING w.* INTO v_parent;
            PERFORM animus.wake_message(v_parent);
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE FUNCTION animus.work_items_waiting_unqueued() RETURNS trigger
    LANGUAGE plpgsql
    SET search_path TO 'pg_catalog', 'pg_temp'
    AS $$
BEGIN
    PERFORM animus.archive_messages(NEW.queue, ARRAY[NEW.msg_id]);
    NEW.msg_id := NULL;
    RETURN NEW;
END
$$;

CREATE TABLE animus.approvals (
    id bigint NOT NULL,
    work_id uuid NOT NULL,
    approver text DEFAULT SESSION_USER NOT NULL,
    decision text NOT NULL,
    reason text NOT NULL,
    at timestamp with time zone DEFAULT now() NOT NULL,
    "position" integer,
    CONSTRAINT approvals_decision_check CHECK ((decision = ANY (ARRAY['approve'::text, 'reject'::text]))),
    CONSTRAINT approvals_position_check CHECK (("position" >= 1)),
    CONSTRAINT approvals_reason_check CHECK ((btrim(reason) <> ''::text))
);

ALTER TABLE animus.approvals ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME animus.approvals_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE animus.audit_gaps (
    audit_id bigint NOT NULL,
    seen_at timestamp with time zone DEFAULT now() NOT NULL,
    horizon xid8 DEFAULT pg_snapshot_xmax(pg_current_snapshot()) NOT NULL
);

CREATE TABLE animus.audit_log (
    id bigint NOT NULL,
    work_id uuid NOT NULL,
    event text NOT NULL,
    from_state animus.work_state,
    to_state animus.work_state,
    provenance jsonb NOT NULL,
    db_user text DEFAULT SESSION_USER NOT NULL,
    at timestamp with time zone DEFAULT now() NOT NULL,
    payload jsonb DEFAULT '{}'::jsonb NOT NULL
);

ALTER TABLE animus.audit_log ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME animus.audit_log_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE animus.audit_seal (
    seq bigint NOT NULL,
    audit_id bigint NOT NULL,
    prev_hash bytea NOT NULL,
    hash bytea NOT NULL,
    sealed_at timestamp with time zone DEFAULT now() NOT NULL,
    key_id text
);

COMMENT ON COLUMN animus.audit_seal.key_id IS 'NULL: hash = sha256(prev_hash || row); else hash = HMAC-SHA256(key, prev_hash || row) with the audit key whose fingerprint this is (animus_core.witness.key_id)';

CREATE TABLE animus.components (
    name text NOT NULL,
    install text NOT NULL,
    version text NOT NULL,
    installed_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE animus.console_users (
    name text NOT NULL,
    role text NOT NULL,
    password_hash text NOT NULL,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    created_by text DEFAULT SESSION_USER NOT NULL,
    signed_out_at timestamp with time zone,
    mcp_token_sha256 bytea,
    CONSTRAINT console_users_password_hash_check CHECK ((password_hash ~~ '$argon2id$%'::text)),
    CONSTRAINT console_users_role_check CHECK ((role = ANY (ARRAY['reader'::text, 'submitter'::text, 'approver'::text, 'operator'::text, 'admin'::text])))
);

CREATE TABLE animus.environments (
    hash text NOT NULL,
    environment jsonb NOT NULL,
    first_seen timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE animus.execution_records (
    id bigint NOT NULL,
    work_id uuid NOT NULL,
    attempt integer NOT NULL,
    result text NOT NULL,
    work_type text NOT NULL,
    params_hash text,
    faculty jsonb,
    faculty_hash text,
    engine_version text,
    environment_hash text,
    models jsonb DEFAULT '[]'::jsonb NOT NULL,
    outcome_hash text,
    error text,
    started_at timestamp with time zone NOT NULL,
    finished_at timestamp with time zone DEFAULT now() NOT NULL,
    steps jsonb,
    CONSTRAINT execution_records_known_inputs CHECK (((result = 'lost'::text) OR ((params_hash IS NOT NULL) AND (faculty IS NOT NULL) AND (faculty_hash IS NOT NULL) AND (engine_version IS NOT NULL) AND (environment_hash IS NOT NULL)))),
    CONSTRAINT execution_records_result_check CHECK ((result = ANY (ARRAY['completed'::text, 'failed'::text, 'lost'::text, 'suspended'::text])))
);

ALTER TABLE animus.execution_records ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME animus.execution_records_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE animus.faculty_files (
    sha256 text NOT NULL,
    content text NOT NULL,
    first_seen timestamp with time zone DEFAULT now() NOT NULL,
    CONSTRAINT faculty_files_sha256_check CHECK ((sha256 ~~ 'sha256:%'::text))
);

CREATE TABLE animus.memories (
    id uuid DEFAULT animus.new_id() NOT NULL,
    content text NOT NULL,
    memory_type text DEFAULT 'semantic'::text NOT NULL,
    source text,
    metadata jsonb DEFAULT '{}'::jsonb NOT NULL,
    embedding public.vector,
    embedder text,
    work_id uuid,
    created_at timestamp with time zone DEFAULT now() NOT NULL,
    updated_at timestamp with time zone DEFAULT now() NOT NULL,
    fts tsvector GENERATED ALWAYS AS (to_tsvector('english'::regconfig, content)) STORED,
    CONSTRAINT memories_content_check CHECK ((btrim(content) <> ''::text)),
    CONSTRAINT memories_memory_type_check CHECK ((memory_type ~ '^[a-z][a-z0-9_]*$'::text)),
    CONSTRAINT memories_metadata_check CHECK ((jsonb_typeof(metadata) = 'object'::text))
);

CREATE TABLE animus.memory_config (
    singleton boolean DEFAULT true NOT NULL,
    embedder text NOT NULL,
    dimension integer NOT NULL,
    configured_at timestamp with time zone DEFAULT now() NOT NULL,
    next_embedder text,
    next_dimension integer,
    CONSTRAINT memory_config_dimension_check CHECK (((dimension >= 1) AND (dimension <= 2000))),
    CONSTRAINT memory_config_singleton_check CHECK (singleton)
);

CREATE TABLE animus.schedule_ticks (
    name text NOT NULL,
    tick timestamp with time zone NOT NULL,
    work_id uuid,
    fired_at timestamp with time zone DEFAULT now() NOT NULL
);

CREATE TABLE animus.schema_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    checksum text NOT NULL,
    applied_at timestamp with time zone DEFAULT now() NOT NULL
);

ALTER TABLE animus.signals ALTER COLUMN id ADD GENERATED ALWAYS AS IDENTITY (
    SEQUENCE NAME animus.signals_id_seq
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1
);

CREATE TABLE animus.steps (
    work_id uuid NOT NULL,
    "position" integer NOT NULL,
    name text NOT NULL,
    attempt integer NOT NULL,
    result jsonb,
    result_hash text NOT NULL,
    started_at timestamp with time zone NOT NULL,
    finished_at timestamp with time zone DEFAULT clock_timestamp() NOT NULL,
    duration_ms bigint NOT NULL,
    copied_from uuid,
    CONSTRAINT steps_position_check CHECK (("position" >= 1))
);

CREATE TABLE animus.transitions (
    from_state animus.work_state NOT NULL,
    to_state animus.work_state NOT NULL
);

CREATE TABLE animus.watchers (
    name text NOT NULL,
    until timestamp with time zone NOT NULL
);

ALTER TABLE ONLY animus.approvals
    ADD CONSTRAINT approvals_pkey PRIMARY KEY (id);

ALTER TABLE ONLY animus.audit_gaps
    ADD CONSTRAINT audit_gaps_pkey PRIMARY KEY (audit_id);

ALTER TABLE ONLY animus.audit_log
    ADD CONSTRAINT audit_log_pkey PRIMARY KEY (id);

ALTER TABLE ONLY animus.audit_seal
    ADD CONSTRAINT audit_seal_audit_id_key UNIQUE (audit_id);

ALTER TABLE ONLY animus.audit_seal
    ADD CONSTRAINT audit_seal_pkey PRIMARY KEY (seq);

ALTER TABLE ONLY animus.components
    ADD CONSTRAINT components_pkey PRIMARY KEY (name);

ALTER TABLE ONLY animus.console_users
    ADD CONSTRAINT console_users_pkey PRIMARY KEY (name);

ALTER TABLE ONLY animus.engines
    ADD CONSTRAINT engines_pkey PRIMARY KEY (id);

ALTER TABLE ONLY animus.environments
    ADD CONSTRAINT environments_pkey PRIMARY KEY (hash);

ALTER TABLE ONLY animus.execution_records
    ADD CONSTRAINT execution_records_pkey PRIMARY KEY (id);

ALTER TABLE ONLY animus.faculty_files
    ADD CONSTRAINT faculty_files_pkey PRIMARY KEY (sha256);

ALTER TABLE ONLY animus.memories
    ADD CONSTRAINT memories_pkey PRIMARY KEY (id);

ALTER TABLE ONLY animus.memory_config
    ADD CONSTRAINT memory_config_pkey PRIMARY KEY (singleton);

ALTER TABLE ONLY animus.schedule_ticks
    ADD CONSTRAINT schedule_ticks_pkey PRIMARY KEY (name, tick);

ALTER TABLE ONLY animus.schema_migrations
    ADD CONSTRAINT schema_migrations_pkey PRIMARY KEY (version);

ALTER TABLE ONLY animus.signals
    ADD CONSTRAINT signals_pkey PRIMARY KEY (id);

ALTER TABLE ONLY animus.steps
    ADD CONSTRAINT steps_pkey PRIMARY KEY (work_id, "position");

ALTER TABLE ONLY animus.transitions
    ADD CONSTRAINT transitions_pkey PRIMARY KEY (from_state, to_state);

ALTER TABLE ONLY animus.watchers
    ADD CONSTRAINT watchers_pkey PRIMARY KEY (name);

ALTER TABLE ONLY animus.work_items
    ADD CONSTRAINT work_items_pkey PRIMARY KEY (id);

CREATE UNIQUE INDEX approvals_once_per_gate ON animus.approvals USING btree (work_id, COALESCE("position", 0), approver);

CREATE INDEX audit_log_work ON animus.audit_log USING btree (work_id, id);

CREATE INDEX execution_records_work ON animus.execution_records USING btree (work_id, attempt);

CREATE INDEX memories_fts ON animus.memories USING gin (fts);

CREATE INDEX memories_metadata ON animus.memories USING gin (metadata jsonb_path_ops);

CREATE INDEX memories_source ON animus.memories USING btree (source);

CREATE INDEX memories_type_created ON animus.memories USING btree (memory_type, created_at);

CREATE INDEX schedule_ticks_work ON animus.schedule_ticks USING btree (work_id) WHERE (work_id IS NOT NULL);

CREATE INDEX signals_work ON animus.signals USING btree (work_id, event, id);

CREATE INDEX work_items_created ON animus.work_items USING btree (created_at);

CREATE INDEX work_items_dead ON animus.work_items USING btree (resolved_at) WHERE (state = 'dead'::animus.work_state);

CREATE UNIQUE INDEX work_items_dedup ON animus.work_items USING btree (work_type, dedup_key) WHERE ((dedup_key IS NOT NULL) AND (state <> ALL (ARRAY['completed'::animus.work_state, 'dead'::animus.work_state, 'merged'::animus.work_state, 'cancelled'::animus.work_state])));

CREATE INDEX work_items_finished_resolved ON animus.work_items USING btree (resolved_at) WHERE (state = ANY (ARRAY['completed'::animus.work_state, 'dead'::animus.work_state, 'merged'::animus.work_state, 'cancelled'::animus.work_state]));

CREATE INDEX work_items_merged_into ON animus.work_items USING btree (merged_into) WHERE (merged_into IS NOT NULL);

CREATE INDEX work_items_parent ON animus.work_items USING btree (parent_id) WHERE (parent_id IS NOT NULL);

CREATE INDEX work_items_replay_of ON animus.work_items USING btree (replay_of) WHERE (replay_of IS NOT NULL);

CREATE INDEX work_items_state ON animus.work_items USING btree (state, work_type);

CREATE INDEX work_items_waiting ON animus.work_items USING btree (wake_at, id) WHERE (state = 'waiting'::animus.work_state);

CREATE INDEX work_items_wake_at ON animus.work_items USING btree (queue, work_type, wake_at) WHERE ((state = 'waiting'::animus.work_state) AND (wake_at IS NOT NULL));

CREATE TRIGGER approvals_append_only BEFORE DELETE OR UPDATE ON animus.approvals FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER approvals_no_truncate BEFORE TRUNCATE ON animus.approvals FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER audit_log_append_only BEFORE DELETE OR UPDATE ON animus.audit_log FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER audit_log_db_user BEFORE INSERT ON animus.audit_log FOR EACH ROW WHEN ((new.db_user IS DISTINCT FROM SESSION_USER)) EXECUTE FUNCTION animus.audit_log_session_user();

CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON animus.audit_log FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER audit_seal_append_only BEFORE DELETE OR UPDATE ON animus.audit_seal FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER audit_seal_no_truncate BEFORE TRUNCATE ON animus.audit_seal FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER environments_append_only BEFORE DELETE OR UPDATE ON animus.environments FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER execution_records_append_only BEFORE DELETE OR UPDATE ON animus.execution_records FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER execution_records_no_truncate BEFORE TRUNCATE ON animus.execution_records FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER faculty_files_append_only BEFORE DELETE OR UPDATE ON animus.faculty_files FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER faculty_files_no_truncate BEFORE TRUNCATE ON animus.faculty_files FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER steps_append_only BEFORE UPDATE ON animus.steps FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER steps_no_truncate BEFORE TRUNCATE ON animus.steps FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

CREATE TRIGGER work_item_audit_update AFTER UPDATE ON animus.work_items FOR EACH ROW WHEN (((old.* IS DISTINCT FROM new.*) AND (current_setting('animus.audit_mode'::text, true) IS DISTINCT FROM 'statement'::text))) EXECUTE FUNCTION animus.work_item_updated();

CREATE TRIGGER work_item_wake_parents AFTER UPDATE ON animus.work_items FOR EACH ROW WHEN (((new.state = ANY (ARRAY['completed'::animus.work_state, 'dead'::animus.work_state, 'cancelled'::animus.work_state])) AND (old.state <> ALL (ARRAY['completed'::animus.work_state, 'dead'::animus.work_state, 'cancelled'::animus.work_state])) AND (current_setting('animus.audit_mode'::text, true) IS DISTINCT FROM 'statement'::text))) EXECUTE FUNCTION animus.work_item_wake_parents();

CREATE TRIGGER work_items_audit_insert AFTER INSERT ON animus.work_items REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION animus.work_items_inserted();

CREATE TRIGGER work_items_audit_update AFTER UPDATE ON animus.work_items REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT WHEN ((current_setting('animus.audit_mode'::text, true) = 'statement'::text)) EXECUTE FUNCTION animus.work_items_updated();

CREATE TRIGGER work_items_fixed_columns BEFORE UPDATE OF id, requested_by ON animus.work_items FOR EACH ROW WHEN (((old.id IS DISTINCT FROM new.id) OR (old.requested_by IS DISTINCT FROM new.requested_by))) EXECUTE FUNCTION animus.work_items_refuse_rewrite();

CREATE TRIGGER work_items_no_live_delete BEFORE DELETE ON animus.work_items FOR EACH ROW EXECUTE FUNCTION animus.work_items_refuse_delete();

CREATE TRIGGER work_items_notify_changed AFTER INSERT OR UPDATE ON animus.work_items FOR EACH STATEMENT EXECUTE FUNCTION animus.notify_changed();

CREATE TRIGGER work_items_requested_by BEFORE INSERT ON animus.work_items FOR EACH ROW WHEN ((new.requested_by IS DISTINCT FROM SESSION_USER)) EXECUTE FUNCTION animus.work_items_session_user();

CREATE TRIGGER work_items_waiting_unqueued BEFORE UPDATE ON animus.work_items FOR EACH ROW WHEN (((new.state = 'waiting'::animus.work_state) AND (old.state <> 'waiting'::animus.work_state) AND (new.wake_at IS NULL) AND (new.msg_id IS NOT NULL))) EXECUTE FUNCTION animus.work_items_waiting_unqueued();

CREATE TRIGGER work_items_wake_at BEFORE UPDATE ON animus.work_items FOR EACH ROW WHEN (((old.state = 'waiting'::animus.work_state) AND (new.state <> 'waiting'::animus.work_state))) EXECUTE FUNCTION animus.work_items_left_waiting();

ALTER TABLE ONLY animus.approvals
    ADD CONSTRAINT approvals_work_id_fkey FOREIGN KEY (work_id) REFERENCES animus.work_items(id);

ALTER TABLE ONLY animus.schedule_ticks
    ADD CONSTRAINT schedule_ticks_work_id_fkey FOREIGN KEY (work_id) REFERENCES animus.work_items(id);

ALTER TABLE ONLY animus.signals
    ADD CONSTRAINT signals_work_id_fkey FOREIGN KEY (work_id) REFERENCES animus.work_items(id) ON DELETE CASCADE;

ALTER TABLE ONLY animus.steps
    ADD CONSTRAINT steps_work_id_fkey FOREIGN KEY (work_id) REFERENCES animus.work_items(id) ON DELETE CASCADE;

ALTER TABLE ONLY animus.work_items
    ADD CONSTRAINT work_items_merged_into_fkey FOREIGN KEY (merged_into) REFERENCES animus.work_items(id);

ALTER TABLE ONLY animus.work_items
    ADD CONSTRAINT work_items_parent_id_fkey FOREIGN KEY (parent_id) REFERENCES animus.work_items(id);

ALTER TABLE ONLY animus.work_items
    ADD CONSTRAINT work_items_replay_of_fkey FOREIGN KEY (replay_of) REFERENCES animus.work_items(id);

REVOKE ALL ON FUNCTION animus.add_usage(p_id uuid, p_usage jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.archive_messages(p_queue text, p_msg_ids bigint[]) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.audit_by_statement(p_rows integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.audit_log_session_user() FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.cancel(p_id uuid, p_reason text) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.cancel_attempt(p_id uuid, p_msg_id bigint, p_lease integer, p_duration_ms bigint, p_execution jsonb, p_reason_chars integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.children_text(p_wait jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.children_unfinished(p_wait jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.claim(p_queue text, p_qty integer, p_vt_seconds integer, p_work_types text[], p_start boolean, p_max_attempts jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.copy_steps(p_to uuid, p_from uuid, p_before text) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.dead_letter(p_id uuid, p_reason text) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.drop_message(p_item animus.work_items) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.engine_deregister(p_id uuid) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.engine_heartbeat(p_id uuid, p_running jsonb, p_schedules jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.engine_lost(p_engine animus.engines) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.engine_register(p_id uuid, p_host text, p_pid integer, p_version text, p_heartbeat double precision, p_concurrency integer, p_queues text[], p_faculties jsonb, p_disabled jsonb, p_schedules jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.extend_leases(p_queue text, p_ids uuid[], p_msg_ids bigint[], p_leases integer[], p_seconds integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.fail(p_id uuid, p_msg_id bigint, p_lease integer, p_error text, p_duration_ms bigint) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.fail_attempt(p_id uuid, p_msg_id bigint, p_lease integer, p_error text, p_duration_ms bigint, p_execution jsonb, p_usage jsonb, p_retry_delay double precision, p_reason text) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.held_item(p_id uuid, p_msg_id bigint, p_lease integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.lock_item(p_id uuid) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.notify_changed() FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.q_work_archive(p_msg_ids bigint[]) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.q_work_claim(p_qty integer, p_work_types text[], p_vt_seconds integer, p_now timestamp with time zone, OUT msg_ids bigint[], OUT read_cts integer[], OUT ids uuid[]) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.q_work_send(p_message jsonb, p_at timestamp with time zone) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.q_work_set_vt(p_msg_id bigint, p_at timestamp with time zone, p_skip_locked boolean) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.queue_functions(p_queue text) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.queue_send(p_queue text, p_message jsonb, p_at timestamp with time zone) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.queue_set_vt(p_queue text, p_msg_id bigint, p_at timestamp with time zone, p_skip_locked boolean) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.record_execution(p_execution jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.record_step(p_id uuid, p_msg_id bigint, p_lease integer, p_position integer, p_name text, p_result jsonb, p_result_hash text, p_started_at timestamp with time zone, p_duration_ms bigint) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.record_steps(p_ids uuid[], p_msg_ids bigint[], p_leases integer[], p_positions integer[], p_names text[], p_results jsonb[], p_hashes text[], p_started_at timestamp with time zone[], p_durations bigint[]) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.release(p_id uuid, p_msg_id bigint, p_lease integer, p_reason text) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.requeue_message(p_item animus.work_items, p_delay double precision) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.require_transition(p_id uuid, p_from animus.work_state, p_to animus.work_state) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.retry(p_id uuid, p_delay double precision, p_reason text) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.scaling_depth(p_queue text, p_work_types text[]) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.signal(p_id uuid, p_event text, p_payload jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.signal_many(p_ids uuid[], p_events text[], p_payloads jsonb[]) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.start(p_id uuid, p_msg_id bigint, p_lease integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.status_view(p_dead integer, p_waiting integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.stop_engines(p_engine uuid, p_grace double precision) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.suspend(p_id uuid, p_msg_id bigint, p_lease integer, p_wait jsonb, p_wake_at timestamp with time zone, p_duration_ms bigint, p_execution jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.take_signal(p_id uuid, p_msg_id bigint, p_lease integer, p_event text, p_position integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.timer_woke(p_wait jsonb) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.wake_message(p_item animus.work_items) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.watch(p_name text, p_seconds integer) FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.work_item_updated() FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.work_item_wake_parents() FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.work_items_left_waiting() FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.work_items_refuse_rewrite() FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.work_items_session_user() FROM PUBLIC;

REVOKE ALL ON FUNCTION animus.work_items_waiting_unqueued() FROM PUBLIC;
