-- A lease extension reaches its items by id, whatever the statistics of work_items said when
-- its plan was made (as the claim and the completion do since 0048).
--
-- Its lock (in id order) and its check of which leases were lost joined the batch's ids with
-- work_items; planned while work_items held a row, they read the table's whole primary key:
-- 3,013 entries to extend 4 leases over a table of 3,000, and the lease keeper extends every
-- lease an engine holds in one call.

-- As in 0023, but for how it finds its items.
CREATE OR REPLACE FUNCTION animus.extend_leases(p_queue text, p_ids uuid[], p_msg_ids bigint[],
                                                p_leases int[], p_seconds int)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
$$;

-- replaced above: its settings (0040, 0042) again
ALTER FUNCTION animus.extend_leases(text, uuid[], bigint[], int[], int)
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION animus.extend_leases(text, uuid[], bigint[], int[], int) SET enable_seqscan = off;
