-- A completion locks its items in id order before it updates them, as every other batch
-- (extend_leases, record_steps, signal_many) locks them. Its UPDATE locked them in the
-- order of its plan, so an engine's completer and its lease keeper, which extends every
-- lease it holds, finished foci included, could each wait for a row the other held: a
-- deadlock, after which the completer completed the batch one item at a time while the
-- extensions kept timing out (an engine with 5,000 foci in flight fell to 5-14% of its
-- ideal, and its fence stopped foci whose leases it could not extend).

CREATE OR REPLACE FUNCTION animus.complete(p_ids uuid[], p_msg_ids bigint[], p_leases int[],
                                           p_data jsonb[], p_duration_ms bigint[])
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_done uuid[];
    v_queues text[];
    v_msgs bigint[];
    bad record;
BEGIN
    PERFORM 1 FROM animus.work_items w WHERE w.id = ANY (p_ids) ORDER BY w.id FOR UPDATE;
    PERFORM animus.audit_by_statement(cardinality(p_ids));
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
