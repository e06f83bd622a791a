-- An item's first signal for an event is found through the item, whatever the statistics of
-- `signals` said when the plan was made.
--
-- The first signal is the one of lowest id, and the statements asked for it as
-- "ORDER BY id LIMIT 1". A plan made while `signals` held a row or two (a new database, or
-- before its first analyze) found it by walking the table's primary key in id order until
-- it met one of the item's, reading most of the table each time: in a wake of 10,000 items,
-- 13 million index entries (the engine's resuming claim, the same in every suspension on an
-- event). They are now ordered by an expression of id that no index supplies: the one index
-- a plan can read is signals_work, by the item and its event, and it sorts the few rows it
-- finds.

-- As in 0038.
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

-- As in 0025.
CREATE OR REPLACE FUNCTION animus.take_signal(p_id uuid, p_msg_id bigint, p_lease int,
                                              p_event text, p_position int)
RETURNS SETOF animus.signals
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
