-- Work items, their state machine, and the audit trail that records every change.
--
-- The state machine lives here as data (animus.transitions) so that the database refuses an
-- illegal transition even when it is issued by hand; animus_core/states.py holds the same
-- table for Python, and a test keeps the two equal.

CREATE TYPE animus.work_state AS ENUM (
    'created', 'queued', 'awaiting_approval', 'claimed', 'running', 'failed',
    'completed', 'dead', 'merged', 'cancelled'
);

CREATE TABLE animus.transitions (
    from_state animus.work_state NOT NULL,
    to_state   animus.work_state NOT NULL,
    PRIMARY KEY (from_state, to_state)
);

INSERT INTO animus.transitions VALUES
    ('created', 'queued'), ('created', 'merged'), ('created', 'awaiting_approval'),
    ('created', 'dead'),
    ('awaiting_approval', 'queued'), ('awaiting_approval', 'dead'),
    ('queued', 'claimed'), ('queued', 'dead'), ('queued', 'cancelled'),
    ('claimed', 'running'), ('claimed', 'queued'),
    ('running', 'completed'), ('running', 'failed'), ('running', 'queued'),
    ('failed', 'queued'), ('failed', 'dead');

-- uuidv7 keeps new ids in index order (cheaper inserts); older servers fall back to v4.
DO $$
BEGIN
    IF current_setting('server_version_num')::int >= 180000 THEN
        EXECUTE 'CREATE FUNCTION animus.new_id() RETURNS uuid LANGUAGE sql VOLATILE
                 AS $f$ SELECT uuidv7() $f$';
    ELSE
        EXECUTE 'CREATE FUNCTION animus.new_id() RETURNS uuid LANGUAGE sql VOLATILE
                 AS $f$ SELECT gen_random_uuid() $f$';
    END IF;
END
$$;

CREATE TABLE animus.work_items (
    id           uuid PRIMARY KEY DEFAULT animus.new_id(),
    work_type    text NOT NULL CHECK (work_type <> ''),
    dedup_key    text CHECK (dedup_key <> ''),
    params       jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
    source       text NOT NULL CHECK (source <> ''),
    trigger      text,
    priority     int NOT NULL DEFAULT 0,
    state        animus.work_state NOT NULL,
    reason       text,
    queue        text NOT NULL DEFAULT 'work',
    parent_id    uuid REFERENCES animus.work_items (id),
    merged_into  uuid REFERENCES animus.work_items (id),
    replay_of    uuid REFERENCES animus.work_items (id),
    traceparent  text,
    gate         jsonb,   -- the approval a rule required: {"rule", "role", "quorum", "reason"}
    requested_by text NOT NULL DEFAULT session_user,
    attempts     int NOT NULL DEFAULT 0,
    max_attempts int NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    outcome_data jsonb,
    outcome_error text,
    duration_ms  bigint,
    msg_id       bigint,
    lease        int,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    resolved_at  timestamptz,
    CHECK ((state = 'merged') = (merged_into IS NOT NULL))
);

-- Structural dedup: one live item per (work_type, dedup_key).
CREATE UNIQUE INDEX work_items_dedup ON animus.work_items (work_type, dedup_key)
    WHERE dedup_key IS NOT NULL
      AND state NOT IN ('completed', 'dead', 'merged', 'cancelled');
CREATE INDEX work_items_state ON animus.work_items (state, work_type);
CREATE INDEX work_items_parent ON animus.work_items (parent_id) WHERE parent_id IS NOT NULL;
CREATE INDEX work_items_created ON animus.work_items (created_at);

-- ---------------------------------------------------------------------------------------
-- Audit trail: append-only, hash-chained after commit by animus.audit_seal.
-- ---------------------------------------------------------------------------------------

CREATE TABLE animus.audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    work_id     uuid NOT NULL,
    event       text NOT NULL,
    from_state  animus.work_state,
    to_state    animus.work_state,
    provenance  jsonb NOT NULL,
    db_user     text NOT NULL DEFAULT session_user,  -- the login role, also inside definer functions
    at          timestamptz NOT NULL DEFAULT now(),
    payload     jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_work ON animus.audit_log (work_id, id);

-- The chain is kept beside the log, so the log itself never needs an UPDATE: sealing appends
-- one row per audit row, in the order the sealer saw them commit. seq is the chain position.
CREATE TABLE animus.audit_seal (
    seq        bigint PRIMARY KEY,
    audit_id   bigint NOT NULL UNIQUE REFERENCES animus.audit_log (id),
    prev_hash  bytea NOT NULL,
    hash       bytea NOT NULL,
    sealed_at  timestamptz NOT NULL DEFAULT now()
);

-- Rows waiting to be sealed, so the sealer never scans the whole log. Written by the same
-- statement that writes the audit row; emptied by the sealer in the transaction that seals.
CREATE TABLE animus.audit_unsealed (audit_id bigint PRIMARY KEY);

CREATE FUNCTION animus.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on %.% is refused: the audit trail is append-only',
        TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit rows can only be added; verify the chain with: animus audit verify';
END
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON animus.audit_log
    FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON animus.audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();
CREATE TRIGGER audit_seal_append_only BEFORE UPDATE OR DELETE ON animus.audit_seal
    FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();
CREATE TRIGGER audit_seal_no_truncate BEFORE TRUNCATE ON animus.audit_seal
    FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

-- Who is acting: the engine and CLI set animus.actor for their session; psql users show up
-- with their database user alone.
CREATE FUNCTION animus.actor() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('animus.actor', true), '')
$$;

-- ---------------------------------------------------------------------------------------
-- Triggers on work_items: validate transitions and write the audit rows, set-based.
-- ---------------------------------------------------------------------------------------

CREATE FUNCTION animus.work_items_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
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

    WITH a AS (
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
      FROM new_rows n ORDER BY n.created_at, n.id
    RETURNING id)
    INSERT INTO animus.audit_unsealed SELECT id FROM a;

    PERFORM pg_notify('animus_work', json_build_object(
                'queue', q.queue, 'work_types', q.types)::text)
       FROM (SELECT queue, array_agg(DISTINCT work_type ORDER BY work_type) AS types
               FROM new_rows WHERE state = 'queued' GROUP BY queue) q;
    RETURN NULL;
END
$$;

CREATE TRIGGER work_items_audit_insert AFTER INSERT ON animus.work_items
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION animus.work_items_inserted();

CREATE FUNCTION animus.work_items_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad record;
BEGIN
    SELECT n.id, o.state AS from_state, n.state AS to_state INTO bad
      FROM new_rows n JOIN old_rows o USING (id)
     WHERE o.state IS DISTINCT FROM n.state
       AND NOT EXISTS (SELECT 1 FROM animus.transitions t
                        WHERE t.from_state = o.state AND t.to_state = n.state)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'illegal transition for work item %: % -> %',
            bad.id, bad.from_state, bad.to_state
            USING ERRCODE = 'ANI01',
                  HINT = 'legal transitions are listed in animus.transitions';
    END IF;

    WITH a AS (
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id, n.state::text, o.state, n.state,
           jsonb_strip_nulls(jsonb_build_object(
               'source', n.source, 'trigger', n.trigger, 'actor', animus.actor())),
           jsonb_strip_nulls(jsonb_build_object(
               'reason', n.reason, 'attempts', n.attempts,
               'error', CASE WHEN n.state IN ('failed', 'dead') THEN n.outcome_error END,
               'outcome', CASE WHEN n.state = 'completed' THEN n.outcome_data END,
               'duration_ms', CASE WHEN n.state IN ('completed', 'failed') THEN n.duration_ms END))
      FROM new_rows n JOIN old_rows o USING (id)
     WHERE o.state IS DISTINCT FROM n.state
     ORDER BY n.id
    RETURNING id)
    INSERT INTO animus.audit_unsealed SELECT id FROM a;
    RETURN NULL;
END
$$;

CREATE TRIGGER work_items_audit_update AFTER UPDATE ON animus.work_items
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION animus.work_items_updated();

CREATE FUNCTION animus.work_items_refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.state NOT IN ('completed', 'dead', 'merged', 'cancelled') THEN
        RAISE EXCEPTION 'work item % is %: only finished work can be deleted', OLD.id, OLD.state
            USING ERRCODE = 'ANI01';
    END IF;
    RETURN OLD;
END
$$;

CREATE TRIGGER work_items_no_live_delete BEFORE DELETE ON animus.work_items
    FOR EACH ROW EXECUTE FUNCTION animus.work_items_refuse_delete();

-- ---------------------------------------------------------------------------------------
-- Queues: a pgmq queue plus an index that lets claims honour priority.
-- ---------------------------------------------------------------------------------------

CREATE FUNCTION animus.create_queue(p_queue text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgmq.create(p_queue);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (((message->>''p'')::int) DESC, msg_id)',
                   'q_' || p_queue || '_prio', 'q_' || p_queue);
END
$$;

-- ---------------------------------------------------------------------------------------
-- Submit: dedup decided inside the transaction, one round trip for a batch.
-- p_items is a JSON array of objects with the work_items columns a submitter may set.
-- Returns one work item per input, in input order (merged ones name their canonical item).
-- ---------------------------------------------------------------------------------------

CREATE FUNCTION animus.submit(p_queue text, p_items jsonb)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    v_id uuid;
    v_canonical uuid;
    v_msgs jsonb[];
    v_ids uuid[];
    v_collisions bool;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        RAISE EXCEPTION 'queue "%" does not exist', p_queue
            USING ERRCODE = 'ANI04', HINT = 'create it with Db.create_queue or animus db migrate';
    END IF;

    CREATE TEMP TABLE IF NOT EXISTS animus_submit_input (
        ord bigint, id uuid, work_type text, dedup_key text, params jsonb, source text,
        trigger text, priority int, parent_id uuid, replay_of uuid, max_attempts int,
        traceparent text, state animus.work_state, reason text, gate jsonb, inserted bool
    ) ON COMMIT DELETE ROWS;
    DELETE FROM animus_submit_input;   -- empty unless called twice in one transaction

    INSERT INTO animus_submit_input
    SELECT e.ord, animus.new_id(), x.work_type, x.dedup_key, coalesce(x.params, '{}'),
           x.source, x.trigger, coalesce(x.priority, 0), x.parent_id, x.replay_of,
           coalesce(x.max_attempts, 3), x.traceparent,
           coalesce(x.state, 'queued')::animus.work_state, coalesce(x.reason, 'submitted'),
           x.gate, false
      FROM jsonb_array_elements(p_items) WITH ORDINALITY AS e(j, ord),
           jsonb_to_record(e.j) AS x(work_type text, dedup_key text, params jsonb, source text,
                                     trigger text, priority int, parent_id uuid,
                                     replay_of uuid, max_attempts int, traceparent text,
                                     state text, reason text, gate jsonb);

    -- Rules may start an item awaiting approval or dead (denied); nothing else.
    IF EXISTS (SELECT 1 FROM animus_submit_input
                WHERE state NOT IN ('queued', 'awaiting_approval', 'dead')) THEN
        RAISE EXCEPTION 'a submitted item can start queued, awaiting_approval or dead'
            USING ERRCODE = 'ANI01';
    END IF;

    WITH ins AS (
        INSERT INTO animus.work_items AS w
               (id, work_type, dedup_key, params, source, trigger, priority, state, reason,
                queue, parent_id, replay_of, max_attempts, traceparent, gate, resolved_at)
        SELECT i.id, i.work_type, i.dedup_key, i.params, i.source, i.trigger, i.priority,
               i.state, i.reason, p_queue, i.parent_id, i.replay_of, i.max_attempts,
               i.traceparent, i.gate, CASE WHEN i.state = 'dead' THEN now() END
          FROM animus_submit_input i ORDER BY i.ord
        ON CONFLICT (work_type, dedup_key)
           WHERE dedup_key IS NOT NULL
             AND state NOT IN ('completed', 'dead', 'merged', 'cancelled')
        DO NOTHING
        RETURNING w.id
    )
    UPDATE animus_submit_input i SET inserted = true FROM ins WHERE i.id = ins.id;

    FOR r IN SELECT * FROM animus_submit_input i WHERE NOT i.inserted ORDER BY i.ord LOOP
        LOOP
            SELECT w.id INTO v_canonical FROM animus.work_items w
             WHERE w.work_type = r.work_type AND w.dedup_key = r.dedup_key
               AND w.state NOT IN ('completed', 'dead', 'merged', 'cancelled')
             FOR SHARE;
            IF FOUND THEN
                INSERT INTO animus.work_items
                       (id, work_type, dedup_key, params, source, trigger, priority, state,
                        reason, queue, parent_id, replay_of, max_attempts, merged_into,
                        resolved_at, traceparent)
                VALUES (r.id, r.work_type, r.dedup_key, r.params, r.source, r.trigger,
                        r.priority, 'merged', 'duplicate of ' || v_canonical, p_queue,
                        r.parent_id, r.replay_of, r.max_attempts, v_canonical, now(),
                        r.traceparent);
                UPDATE animus_submit_input i SET inserted = false WHERE i.id = r.id;
                EXIT;
            END IF;
            INSERT INTO animus.work_items AS w
                   (id, work_type, dedup_key, params, source, trigger, priority, state, reason,
                    queue, parent_id, replay_of, max_attempts, traceparent, gate)
            VALUES (r.id, r.work_type, r.dedup_key, r.params, r.source, r.trigger, r.priority,
                    r.state, r.reason, p_queue, r.parent_id, r.replay_of, r.max_attempts,
                    r.traceparent, r.gate)
            ON CONFLICT (work_type, dedup_key)
               WHERE dedup_key IS NOT NULL
                 AND state NOT IN ('completed', 'dead', 'merged', 'cancelled')
            DO NOTHING
            RETURNING w.id INTO v_id;
            IF v_id IS NOT NULL THEN
                UPDATE animus_submit_input i SET inserted = true WHERE i.id = r.id;
                EXIT;
            END IF;
        END LOOP;
    END LOOP;

    SELECT array_agg(jsonb_build_object('id', i.id, 't', i.work_type, 'p', i.priority)
                     ORDER BY i.ord) FILTER (WHERE i.inserted AND i.state = 'queued'),
           array_agg(i.id ORDER BY i.ord)
      INTO v_msgs, v_ids FROM animus_submit_input i;
    IF v_msgs IS NOT NULL THEN
        PERFORM pgmq.send_batch(p_queue, v_msgs);
    END IF;

    -- by primary key, in input order (the temp table has no statistics: a join with it
    -- was planned as a sequential scan of the whole work_items table)
    RETURN QUERY
        SELECT w.* FROM unnest(v_ids) WITH ORDINALITY AS u(id, ord)
          JOIN animus.work_items w ON w.id = u.id
         ORDER BY u.ord;
END
$$;

-- ---------------------------------------------------------------------------------------
-- Claim: read visible messages by priority, take their items, settle expired leases.
-- A claim is a lease: the message's visibility timeout. lease = the message's read count,
-- so a holder whose lease expired and was re-claimed cannot complete it.
-- ---------------------------------------------------------------------------------------

CREATE FUNCTION animus.claim(p_queue text, p_qty int, p_vt_seconds int,
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

    UPDATE animus.work_items w
       SET state = 'claimed', msg_id = c.msg_id, lease = c.read_ct, reason = NULL,
           updated_at = now()
      FROM unnest(v_ids, v_msgs, v_reads) AS c(id, msg_id, read_ct)
     WHERE w.id = c.id AND w.id = ANY (v_ids) AND w.state = 'queued';

    IF p_start THEN
        UPDATE animus.work_items w
           SET state = 'running', attempts = w.attempts + 1, updated_at = now()
          FROM unnest(v_ids, v_reads) AS c(id, read_ct)
         WHERE w.id = c.id AND w.id = ANY (v_ids) AND w.state = 'claimed' AND w.lease = c.read_ct;
    END IF;

    RETURN QUERY
        SELECT w.* FROM unnest(v_ids, v_msgs, v_reads) AS c(id, msg_id, read_ct)
          JOIN animus.work_items w
            ON w.id = c.id AND w.lease = c.read_ct AND w.msg_id = c.msg_id
         WHERE w.id = ANY (v_ids) AND w.state IN ('claimed', 'running')
         ORDER BY w.priority DESC, c.msg_id;
END
$$;

-- Complete a batch of running items the caller holds (id, msg_id, lease must all match).
CREATE FUNCTION animus.complete(p_ids uuid[], p_msg_ids bigint[], p_leases int[],
                                p_data jsonb[], p_duration_ms bigint[])
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    v_done uuid[];
    v_queues text[];
    v_msgs bigint[];
    bad record;
BEGIN
    WITH x AS (
        SELECT * FROM unnest(p_ids, p_msg_ids, p_leases, p_data, p_duration_ms)
                 AS x(id, msg_id, lease, data, duration_ms)
    ), upd AS (
        UPDATE animus.work_items w
           SET state = 'completed', outcome_data = x.data, outcome_error = NULL,
               duration_ms = x.duration_ms, reason = 'completed', resolved_at = now(),
               updated_at = now()
          FROM x
         WHERE w.id = x.id AND w.id = ANY (p_ids) AND w.msg_id = x.msg_id AND w.lease = x.lease
           AND w.state = 'running'
        RETURNING w.id, w.queue, w.msg_id
    )
    SELECT array_agg(upd.id), array_agg(upd.queue), array_agg(upd.msg_id)
      INTO v_done, v_queues, v_msgs FROM upd;

    PERFORM pgmq.archive(t.queue, array_agg(t.msg_id))
       FROM unnest(v_queues, v_msgs) AS t(queue, msg_id) GROUP BY t.queue;

    IF coalesce(array_length(v_done, 1), 0) <> coalesce(array_length(p_ids, 1), 0) THEN
        SELECT x.id, w.state, w.lease = x.lease AS same_lease INTO bad
          FROM unnest(p_ids, p_leases) AS x(id, lease)
          LEFT JOIN animus.work_items w ON w.id = x.id
         WHERE v_done IS NULL OR NOT x.id = ANY (v_done)
         LIMIT 1;
        IF bad.state IS NULL THEN
            RAISE EXCEPTION 'work item % does not exist', bad.id USING ERRCODE = 'ANI04';
        ELSIF bad.state = 'running' AND NOT bad.same_lease THEN
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
