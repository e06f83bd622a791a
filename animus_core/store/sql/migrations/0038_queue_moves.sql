-- As 0037 did for a claim and a completion, for the other moves of a queue's messages that
-- come with every wait and every wake: a suspension sets its message's vt (pgmq.set_vt) or
-- archives it (pgmq.archive), a signal or a timer makes it visible again or sends a new one
-- (pgmq.send). Each was dynamic SQL, planned on every call: a Db.signal that woke an item ran
-- four such statements, 1-2 ms of its 2.8 ms. Each queue gets two more functions of static
-- SQL, animus.q_<queue>_set_vt and animus.q_<queue>_send, and animus.queue_set_vt and
-- animus.queue_send call the queue's by name.

CREATE OR REPLACE FUNCTION animus.queue_functions(p_queue text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
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
        LANGUAGE plpgsql SET enable_sort = off SET plan_cache_mode = force_generic_plan AS $b$
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
                  FROM taken WHERE m.msg_id = taken.msg_id
                RETURNING m.msg_id, m.read_ct, (m.message->>'id')::uuid AS id
            )
            SELECT array_agg(l.msg_id), array_agg(l.read_ct), array_agg(l.id)
              INTO msg_ids, read_cts, ids FROM leased l;
        END
        $b$$f$, v_q || '_claim', v_q);
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_msg_ids bigint[]) RETURNS void
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $b$
        BEGIN
            WITH gone AS (DELETE FROM pgmq.%2$I WHERE msg_id = ANY (p_msg_ids) RETURNING %4$s)
            INSERT INTO pgmq.%3$I (%4$s) SELECT %4$s FROM gone;
        END
        $b$$f$, v_q || '_archive', v_q, 'a_' || p_queue, v_columns);
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_msg_id bigint, p_at timestamptz,
                                               p_skip_locked bool) RETURNS text
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan AS $b$
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
$fn$;


CREATE FUNCTION animus.queue_set_vt(p_queue text, p_msg_id bigint, p_at timestamptz,
                                    p_skip_locked bool) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_moved text;
BEGIN
    EXECUTE format('SELECT animus.%I($1, $2, $3)', 'q_' || p_queue || '_set_vt')
       INTO v_moved USING p_msg_id, p_at, p_skip_locked;
    RETURN v_moved;
END
$$;

REVOKE ALL ON FUNCTION animus.queue_set_vt(text, bigint, timestamptz, bool) FROM PUBLIC;

CREATE FUNCTION animus.queue_send(p_queue text, p_message jsonb, p_at timestamptz)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_msg bigint;
BEGIN
    EXECUTE format('SELECT animus.%I($1, $2)', 'q_' || p_queue || '_send')
       INTO v_msg USING p_message, p_at;
    RETURN v_msg;
END
$$;

REVOKE ALL ON FUNCTION animus.queue_send(text, jsonb, timestamptz) FROM PUBLIC;

SELECT set_config('animus.create_queue_was_definer', prosecdef::text, true)
  FROM pg_proc WHERE oid = 'animus.create_queue(text)'::regprocedure;

CREATE OR REPLACE FUNCTION animus.create_queue(p_queue text) RETURNS void
LANGUAGE plpgsql AS $$
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

DO $$
BEGIN
    IF current_setting('animus.create_queue_was_definer', true) = 'true' THEN
        ALTER FUNCTION animus.create_queue(text) SECURITY DEFINER;
        ALTER FUNCTION animus.create_queue(text) SET search_path = pg_catalog, pg_temp;
    END IF;
END
$$;

SELECT animus.queue_functions(queue_name) FROM pgmq.meta
 WHERE to_regclass(format('pgmq.%I', 'q_' || queue_name || '_ready')) IS NOT NULL;

-- As in 0030, through the queue's functions.
CREATE OR REPLACE FUNCTION animus.wake_message(p_item animus.work_items) RETURNS void
LANGUAGE plpgsql AS $$
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

-- As in 0012, through the queue's functions.
CREATE OR REPLACE FUNCTION animus.requeue_message(p_item animus.work_items, p_delay float8) RETURNS void
LANGUAGE plpgsql AS $$
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

CREATE OR REPLACE FUNCTION animus.drop_message(p_item animus.work_items) RETURNS void
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
        PERFORM animus.archive_messages(p_item.queue, v_ids);
    END IF;
END
$$;

-- As in 0024, through the queue's function.
CREATE OR REPLACE FUNCTION animus.work_items_waiting_unqueued() RETURNS trigger LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM animus.archive_messages(NEW.queue, ARRAY[NEW.msg_id]);
    RETURN NULL;
END
$$;

-- As in 0025, through the queue's function.
CREATE OR REPLACE FUNCTION animus.suspend(p_id uuid, p_msg_id bigint, p_lease int, p_wait jsonb,
                                          p_wake_at timestamptz, p_duration_ms bigint,
                                          p_execution jsonb)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
                        ORDER BY f.id LIMIT 1);
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
