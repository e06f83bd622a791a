-- A claim and a completion reach their items by id, whatever the statistics of work_items
-- said when their plans were made.
--
-- Both joined the items' ids (an array) with work_items, and each session keeps one plan of
-- them (0040). Made while the statistics said work_items held a row or two (a new database,
-- or one whose finished items retention purged), that plan read the table's whole primary
-- key and compared every entry with every id of the batch: a claim and a completion of 4
-- items read 3,000 entries each over a table of 3,000. The completion's lock took its items
-- in id order the same way. Each id now finds its item in a lateral subquery, which a plan
-- can only run once per id, through the primary key; the update then takes the row it found
-- by its address (ctid). The lock takes them in the order of the sorted ids.

CREATE OR REPLACE FUNCTION animus.take_queued(p_ids uuid[], p_msgs bigint[], p_reads int[],
                                              p_only uuid[], p_start bool)
RETURNS SETOF animus.work_items
LANGUAGE sql AS $$
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

-- As in 0043, but for how it finds its items.
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

-- replaced above: their settings (0040, 0042) again, and no memo of rows by address (each
-- address is looked up once)
ALTER FUNCTION animus.take_queued(uuid[], bigint[], int[], uuid[], bool)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION animus.take_queued(uuid[], bigint[], int[], uuid[], bool) SET enable_seqscan = off;
ALTER FUNCTION animus.take_queued(uuid[], bigint[], int[], uuid[], bool) SET enable_memoize = off;
ALTER FUNCTION animus.complete(uuid[], bigint[], int[], jsonb[], bigint[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION animus.complete(uuid[], bigint[], int[], jsonb[], bigint[])
    SET enable_seqscan = off;
ALTER FUNCTION animus.complete(uuid[], bigint[], int[], jsonb[], bigint[])
    SET enable_memoize = off;
