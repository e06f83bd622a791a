-- Waiting for child work: focus.run_children submits child work items (their ids recorded as
-- a step in the same transaction) and suspends its focus (running -> waiting, no slot, no
-- lease) until every one of them has finished. The wait lists them:
--     {"kind": "children", "position": n, "children": [id, ...], "until": T or null}
-- A child has finished when it is completed, dead or cancelled; a child merged into live
-- work (its dedup key) follows the item it was merged into. No polling: the transaction that
-- finishes the last unfinished child wakes the parent (waiting -> queued), and a suspension
-- whose children have all finished already is woken in the same call.
--
-- Concurrency. The transaction that finishes a child locks each parent that waits for
-- children (FOR NO KEY UPDATE, in id order) and only then looks at the siblings, in a
-- statement of its own (a fresh snapshot): of two children finishing at once, the second to
-- take the lock sees the first one finished. A suspension locks its children (FOR SHARE, and
-- the items they were merged into) before the item and before it looks at them: a child being
-- finished meanwhile is seen finished, or its transaction sees the parent waiting once the
-- suspension commits.

-- Whether any child listed in a wait for children has not finished.
CREATE FUNCTION animus.children_unfinished(p_wait jsonb) RETURNS bool
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (
        SELECT 1 FROM jsonb_array_elements_text(p_wait->'children') AS c(id)
          JOIN animus.work_items w ON w.id = c.id::uuid
          LEFT JOIN animus.work_items m ON m.id = w.merged_into
         WHERE coalesce(m.state, w.state) NOT IN ('completed', 'dead', 'cancelled'))
$$;

-- "1 child", "3 children": how reasons count a wait's children.
CREATE FUNCTION animus.children_text(p_wait jsonb) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE jsonb_array_length(p_wait->'children') WHEN 1 THEN '1 child'
                ELSE jsonb_array_length(p_wait->'children') || ' children' END
$$;

-- After items finished: wake each parent waiting for children none of which is unfinished
-- any more (the items' own parents, and the parents of items merged into them).
CREATE FUNCTION animus.work_items_wake_parents() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_parent animus.work_items;
BEGIN
    FOR v_parent IN
        SELECT p.* FROM animus.work_items p
         WHERE p.id IN (
                   WITH finished AS (
                       SELECT n.id, n.parent_id
                         FROM new_rows n JOIN old_rows o USING (id)
                        WHERE n.state IN ('completed', 'dead', 'cancelled')
                          AND o.state NOT IN ('completed', 'dead', 'cancelled'))
                   SELECT f.parent_id FROM finished f WHERE f.parent_id IS NOT NULL
                   UNION
                   SELECT m.parent_id FROM finished f
                     JOIN animus.work_items m ON m.merged_into = f.id
                    WHERE m.parent_id IS NOT NULL)
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

CREATE TRIGGER work_items_wake_parents AFTER UPDATE ON animus.work_items
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION animus.work_items_wake_parents();

-- As in 0019, and: the timer of a wait for children ran out.
CREATE OR REPLACE FUNCTION animus.timer_woke(p_wait jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p_wait->>'kind'
               WHEN 'sleep' THEN format('woken: sleep until %s ended', p_wait->>'until')
               WHEN 'approval' THEN format('woken: approval (%s x %s) timed out undecided',
                                          p_wait->>'quorum', p_wait->>'role')
               WHEN 'children' THEN format('woken: wait for %s timed out',
                                          animus.children_text(p_wait))
               ELSE format('woken: wait for %s timed out',
                           quote_literal(coalesce(p_wait->>'event', '?'))) END
$$;

-- As in 0019, and: a wait may be for children ({"kind": "children", "children": [id, ...]}),
-- woken in the same call when none of them is unfinished.
CREATE OR REPLACE FUNCTION animus.suspend(p_id uuid, p_msg_id bigint, p_lease int,
                                          p_wait jsonb, p_wake_at timestamptz,
                                          p_duration_ms bigint, p_execution jsonb)
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
    IF v_kind = 'event' AND EXISTS (
           SELECT 1 FROM animus.signals s
            WHERE s.work_id = p_id AND s.event = p_wait->>'event'
              AND s.consumed_by_position IS NULL) THEN
        -- the signal arrived after the attempt last looked for it: woken at once
        v_woken := format('woken: signal %s had arrived', v_event);
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
    PERFORM pgmq.set_vt(v_item.queue, p_msg_id, coalesce(p_wake_at, 'infinity'));
    PERFORM pg_notify('animus_work', json_build_object(
                'queue', v_item.queue, 'work_types', json_build_array(v_item.work_type),
                'wake_at', p_wake_at)::text);
    RETURN NEXT v_item;
END
$$;

REVOKE EXECUTE ON FUNCTION
    animus.children_unfinished(jsonb),
    animus.children_text(jsonb),
    animus.work_items_wake_parents()
  FROM PUBLIC;
