-- A batch's audit trigger also wakes the parents of the items it finished.
--
-- A statement moving two items or more (a claim, a completion) fired a second trigger over
-- the same transition tables, work_items_wake_parents, whose query looked for finished items
-- whatever the statement did: about 50 us of the backend's CPU for every claim of two items,
-- which finishes none. The audit trigger knows which items finished from the audit rows it
-- writes (a move into completed, dead or cancelled); it now wakes their parents itself, with
-- the same query and locks, and skips that work when none finished. Single-item moves (row
-- mode, 0030) are unchanged.

-- As in 0017, and: the wake-up of work_items_wake_parents (0020), for the items it finished.
CREATE OR REPLACE FUNCTION animus.work_items_updated() RETURNS trigger LANGUAGE plpgsql AS $$
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

DROP TRIGGER work_items_wake_parents ON animus.work_items;
DROP FUNCTION animus.work_items_wake_parents();
