-- The rule that decided a submission is on its `submitted` audit row: an allowed item's
-- reason names it (`submitted: allowed by rule 'NAME'`), a denied one's too, and a gated
-- item's gate (rule, role, quorum, reason) is now in the row's payload.

-- As in 0010, and: the gate in the payload.
CREATE OR REPLACE FUNCTION animus.work_items_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
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
