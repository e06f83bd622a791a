-- A leaner claim.
--
-- Queue tables: a claim moves a message's visibility timeout (vt). pgmq indexes vt, so every
-- claim and every lease extension wrote a new entry into each of the queue's three indexes.
-- animus never looks messages up by vt (a claim walks the priority index and filters on
-- vt), so the vt index goes, and the queue tables keep half of each page free: a claim or a
-- lease extension then rewrites the message in place (a HOT update, no index entries).
--
-- claim(): the probe for stale messages (an expired lease, a finished or missing item) ran
-- before every claim. The claim now takes the plainly queued items first and does the
-- bookkeeping only when some message was left over.
--
-- complete(): a lost lease is reported as such, whatever state the item reached since.
--
-- Audit rows: provenance and payload are built with JSON_OBJECT(... ABSENT ON NULL), which
-- leaves out null members at the top level only. jsonb_strip_nulls also removed null members
-- nested inside params and outcomes, so the audit trail did not record them as given.

-- Existing queues: drop the vt index and leave room on each page (new pages only).
DO $$
DECLARE
    q text;
BEGIN
    FOR q IN SELECT queue_name FROM pgmq.meta LOOP
        EXECUTE format('DROP INDEX IF EXISTS pgmq.%I', 'q_' || q || '_vt_idx');
        EXECUTE format('ALTER TABLE pgmq.%I SET (fillfactor = 50)', 'q_' || q);
    END LOOP;
END
$$;

-- New queues get the same shape. A queue that has it already is left alone: pgmq.create
-- would build the vt index again over the whole table, and dropping it takes an exclusive
-- lock, on every engine start. `animus roles setup` makes create_queue a SECURITY DEFINER
-- function: replacing it keeps that.
SELECT set_config('animus.create_queue_was_definer', prosecdef::text, true)
  FROM pg_proc WHERE oid = 'animus.create_queue(text)'::regprocedure;

CREATE OR REPLACE FUNCTION animus.create_queue(p_queue text) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF to_regclass(format('pgmq.%I', 'q_' || p_queue || '_prio')) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pgmq.create(p_queue);
    EXECUTE format('CREATE INDEX IF NOT EXISTS %I ON pgmq.%I (((message->>''p'')::int) DESC, msg_id)',
                   'q_' || p_queue || '_prio', 'q_' || p_queue);
    EXECUTE format('DROP INDEX IF EXISTS pgmq.%I', 'q_' || p_queue || '_vt_idx');
    EXECUTE format('ALTER TABLE pgmq.%I SET (fillfactor = 50)', 'q_' || p_queue);
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

-- queued -> claimed, or with p_start queued -> (claimed ->) running in the same UPDATE, for
-- the items among p_only; the lease is the message and its read count. Highest priority
-- first.
CREATE FUNCTION animus.take_queued(p_ids uuid[], p_msgs bigint[], p_reads int[],
                                   p_only uuid[], p_start bool)
RETURNS SETOF animus.work_items
LANGUAGE sql AS $$
    WITH claimed AS (
        UPDATE animus.work_items w
           SET state = CASE WHEN p_start THEN 'running' ELSE 'claimed' END::animus.work_state,
               attempts = w.attempts + CASE WHEN p_start THEN 1 ELSE 0 END,
               msg_id = c.msg_id, lease = c.read_ct, reason = NULL, updated_at = now()
          FROM unnest(p_ids, p_msgs, p_reads) AS c(id, msg_id, read_ct)
         WHERE w.id = c.id AND w.id = ANY (p_only) AND w.state = 'queued'
        RETURNING w.*)
    SELECT * FROM claimed ORDER BY priority DESC, msg_id
$$;

CREATE OR REPLACE FUNCTION animus.claim(p_queue text, p_qty int, p_vt_seconds int,
                                        p_work_types text[], p_start bool)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql AS $$
DECLARE
    v_ids uuid[];
    v_msgs bigint[];
    v_reads int[];
    v_claimed int;
    v_stale uuid[];
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

    -- the usual case: every message's item is plainly queued
    RETURN QUERY SELECT * FROM animus.take_queued(v_ids, v_msgs, v_reads, v_ids, p_start);
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    IF v_claimed = cardinality(v_ids) THEN
        RETURN;
    END IF;

    -- Messages left over: their item's lease expired (claimed or running), it failed and
    -- waits for a retry, it finished, or it is missing. Items claimed just above are not
    -- among them (whichever of their messages they were claimed through).
    SELECT array_agg(c.id) INTO v_stale
      FROM unnest(v_ids) AS c(id)
      LEFT JOIN animus.work_items w ON w.id = c.id
     WHERE w.id IS NULL
        OR NOT EXISTS (SELECT 1 FROM unnest(v_msgs, v_reads) AS m(msg_id, read_ct)
                        WHERE m.msg_id = w.msg_id AND m.read_ct = w.lease);

    UPDATE animus.work_items w
       SET state = 'queued', reason = 'lease expired before the focus started',
           updated_at = now()
     WHERE w.id = ANY (v_stale) AND w.state = 'claimed';
    UPDATE animus.work_items w
       SET state = 'failed', outcome_error = 'lease expired while running (engine lost)',
           reason = 'lease expired while running (engine lost)', updated_at = now()
     WHERE w.id = ANY (v_stale) AND w.state = 'running';
    UPDATE animus.work_items w
       SET state = CASE WHEN w.attempts < w.max_attempts THEN 'queued'
                        ELSE 'dead' END::animus.work_state,
           reason = CASE WHEN w.attempts < w.max_attempts
                         THEN 'retry after: ' || coalesce(w.outcome_error, 'failure')
                         ELSE 'attempts exhausted (' || w.attempts || '/' || w.max_attempts
                              || '): ' || coalesce(w.outcome_error, 'failure') END,
           resolved_at = CASE WHEN w.attempts < w.max_attempts THEN NULL ELSE now() END,
           updated_at = now()
     WHERE w.id = ANY (v_stale) AND w.state = 'failed';
    -- a message whose item is still not queued has nothing left to deliver
    PERFORM pgmq.archive(p_queue, array_agg(c.msg_id))
       FROM unnest(v_ids, v_msgs) AS c(id, msg_id)
       LEFT JOIN animus.work_items w ON w.id = c.id
      WHERE c.id = ANY (v_stale) AND (w.id IS NULL OR w.state <> 'queued')
     HAVING count(*) > 0;

    -- the items the bookkeeping put back in the queue are claimed through these messages
    RETURN QUERY SELECT * FROM animus.take_queued(v_ids, v_msgs, v_reads, v_stale, p_start);
END
$$;

CREATE OR REPLACE FUNCTION animus.work_items_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_actor text := animus.actor();
BEGIN
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    SELECT n.id, s.to_state::text, s.from_state, s.to_state,
           JSON_OBJECT('source': n.source, 'trigger': n.trigger, 'actor': v_actor
                       ABSENT ON NULL RETURNING jsonb),
           JSON_OBJECT('reason': n.reason, 'attempts': s.attempts,
                       'error': CASE WHEN n.state IN ('failed', 'dead') THEN n.outcome_error END,
                       'outcome': CASE WHEN n.state = 'completed' THEN n.outcome_data END,
                       'duration_ms': CASE WHEN n.state IN ('completed', 'failed')
                                           THEN n.duration_ms END
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
     ORDER BY n.id, steps.step;
    RETURN NULL;
END
$$;

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
                       'max_attempts': n.max_attempts, 'reason': n.reason
                       ABSENT ON NULL RETURNING jsonb)
      FROM new_rows n ORDER BY n.created_at, n.id;

    PERFORM pg_notify('animus_work', json_build_object(
                'queue', q.queue, 'work_types', q.types)::text)
       FROM (SELECT queue, array_agg(DISTINCT work_type ORDER BY work_type) AS types
               FROM new_rows WHERE state = 'queued' GROUP BY queue) q;
    RETURN NULL;
END
$$;

-- complete(): a caller whose lease was lost is told so whatever state the item reached since
-- (claimed again, queued, failed, dead), not only when it is running again.
CREATE OR REPLACE FUNCTION animus.complete(p_ids uuid[], p_msg_ids bigint[], p_leases int[],
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
