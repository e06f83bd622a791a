-- Moves of one item cost less: the audit of an update and the wake-up of parents fire per row
-- for a move of one item (once per statement for a batch), and a signal or a decision wakes
-- its item's message in one statement.
--
-- As statement triggers over transition tables they cost about half a millisecond for every
-- UPDATE of work_items, whatever it changed: their queries are planned again at each firing,
-- and they fire for statements that update no row at all. Nearly every move on the path of a
-- single item (signal, claim, suspend, complete) updates one row, so that fixed cost was a
-- good part of its cost. As row triggers with a WHEN condition they cost nothing for the rows
-- they do not concern and their plans are kept for the session, but each row costs more than
-- it does in a statement trigger: from two rows on, the statement trigger is cheaper.
-- So both are kept: the row triggers by default, and the statement triggers (unchanged) while
-- the setting animus.audit_mode is 'statement', which animus.claim and animus.complete set
-- for a batch of two items or more. Either way the same audit rows are written, with the same
-- payloads, checked against animus.transitions the same way (a claim that starts its focus
-- is two steps), exactly once: for a row the setting decides as it is updated, for the
-- statement as it ends, and only the owner may update work_items (its functions do not
-- change the setting between the two). The one difference: the audit rows of a statement
-- moving several items in row mode come item by item, in update order, not sorted by id.

-- Statement mode for a batch (p_rows of 2 or more), row mode otherwise, until the end of the
-- transaction or the next call.
CREATE FUNCTION animus.audit_by_statement(p_rows int) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    SELECT set_config('animus.audit_mode', CASE WHEN p_rows >= 2 THEN 'statement'
                                                ELSE 'row' END, true)
$$;

CREATE FUNCTION animus.work_item_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    v_provenance jsonb := JSON_OBJECT('source': NEW.source, 'trigger': NEW.trigger,
                                      'actor': animus.actor() ABSENT ON NULL RETURNING jsonb);
    v_from animus.work_state := OLD.state;
    v_columns jsonb;
BEGIN
    IF OLD.state IS DISTINCT FROM NEW.state THEN
        IF OLD.state = 'queued' AND NEW.state = 'running'
           AND (NEW.msg_id, NEW.lease) IS DISTINCT FROM (OLD.msg_id, OLD.lease) THEN
            -- a claim that starts its focus: queued -> claimed, then claimed -> running
            INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance,
                                          payload)
            VALUES (NEW.id, 'claimed', 'queued', 'claimed', v_provenance,
                    JSON_OBJECT('reason': NEW.reason, 'attempts': OLD.attempts
                                ABSENT ON NULL RETURNING jsonb));
            v_from := 'claimed';
        END IF;
        IF NOT EXISTS (SELECT 1 FROM animus.transitions t
                        WHERE t.from_state = v_from AND t.to_state = NEW.state) THEN
            PERFORM animus.refuse_transition(NEW.id, v_from, NEW.state);
        END IF;
        INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
        VALUES (NEW.id,
                CASE WHEN v_from = 'running' AND NEW.state = 'waiting' THEN 'suspended'
                     WHEN v_from = 'waiting' AND NEW.state = 'queued' THEN 'woken'
                     ELSE NEW.state::text END,
                v_from, NEW.state, v_provenance,
                JSON_OBJECT('reason': NEW.reason, 'attempts': NEW.attempts,
                            'error': CASE WHEN NEW.state IN ('failed', 'dead')
                                          THEN NEW.outcome_error END,
                            'outcome': CASE WHEN NEW.state = 'completed'
                                            THEN NEW.outcome_data END,
                            'duration_ms': CASE WHEN NEW.state IN ('completed', 'failed',
                                                                   'waiting')
                                                THEN NEW.duration_ms END,
                            'wait': CASE WHEN NEW.state = 'waiting' THEN NEW.wait END,
                            'wake_at': CASE WHEN NEW.state = 'waiting' THEN NEW.wake_at END,
                            'suspensions': CASE WHEN NEW.state = 'waiting'
                                                THEN NEW.suspensions END
                            ABSENT ON NULL RETURNING jsonb));
        IF (OLD.work_type, OLD.dedup_key, OLD.params, OLD.source, OLD.trigger, OLD.priority,
            OLD.queue, OLD.parent_id, OLD.merged_into, OLD.replay_of, OLD.traceparent, OLD.gate,
            OLD.max_attempts, OLD.created_at, OLD.usage, OLD.cancel_requested)
           IS NOT DISTINCT FROM
           (NEW.work_type, NEW.dedup_key, NEW.params, NEW.source, NEW.trigger, NEW.priority,
            NEW.queue, NEW.parent_id, NEW.merged_into, NEW.replay_of, NEW.traceparent, NEW.gate,
            NEW.max_attempts, NEW.created_at, NEW.usage, NEW.cancel_requested) THEN
            RETURN NULL;  -- a move of the state machine, and nothing else
        END IF;
    END IF;

    -- A change of anything else is audited as `changed`, with each column's old and new value
    -- (a move's own columns left out), unless an approval or a cancel request audited it already.
    SELECT jsonb_object_agg(nc.key, jsonb_build_object('old', oc.value, 'new', nc.value))
      INTO v_columns
      FROM jsonb_each(to_jsonb(NEW)) AS nc
      JOIN jsonb_each(to_jsonb(OLD)) AS oc ON oc.key = nc.key
     WHERE nc.value IS DISTINCT FROM oc.value
       AND nc.key <> ALL (CASE WHEN OLD.state = NEW.state THEN ARRAY['updated_at']
                               ELSE ARRAY['state', 'reason', 'attempts', 'outcome_data',
                                          'outcome_error', 'duration_ms', 'msg_id', 'lease',
                                          'resolved_at', 'updated_at', 'wait', 'wake_at',
                                          'suspensions'] END);
    IF v_columns IS NULL
       OR (OLD.state = NEW.state AND EXISTS (
               SELECT 1 FROM animus.audit_log a
                WHERE a.work_id = NEW.id AND a.at = now() AND a.db_user = session_user
                  AND CASE a.event
                          WHEN 'approval' THEN v_columns - 'reason' = '{}'
                          WHEN 'cancel_requested' THEN v_columns - 'cancel_requested' = '{}'
                          ELSE false END)) THEN
        RETURN NULL;
    END IF;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (NEW.id, 'changed', NEW.state, NEW.state, v_provenance,
            jsonb_build_object('columns', v_columns));
    RETURN NULL;
END
$$;

CREATE TRIGGER work_item_audit_update AFTER UPDATE ON animus.work_items
    FOR EACH ROW WHEN (OLD.* IS DISTINCT FROM NEW.*
                       AND current_setting('animus.audit_mode', true) IS DISTINCT FROM 'statement')
    EXECUTE FUNCTION animus.work_item_updated();
DROP TRIGGER work_items_audit_update ON animus.work_items;
CREATE TRIGGER work_items_audit_update AFTER UPDATE ON animus.work_items
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (current_setting('animus.audit_mode', true) = 'statement')
    EXECUTE FUNCTION animus.work_items_updated();

-- After an item finished: wake each parent waiting for children none of which is unfinished
-- any more (the item's own parent, and the parents of items merged into it), locked in id
-- order, and looked at in a statement of its own (a fresh snapshot), as in 0020.
CREATE FUNCTION animus.work_item_wake_parents() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_parent animus.work_items;
BEGIN
    FOR v_parent IN
        SELECT p.* FROM animus.work_items p
         WHERE p.id IN (SELECT NEW.parent_id
                        UNION
                        SELECT m.parent_id FROM animus.work_items m
                         WHERE m.merged_into = NEW.id AND m.parent_id IS NOT NULL)
           AND p.state = 'waiting' AND p.wait->>'kind' = 'children'
         ORDER BY p.id
           FOR NO KEY UPDATE OF p
    LOOP
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

CREATE TRIGGER work_item_wake_parents AFTER UPDATE ON animus.work_items
    FOR EACH ROW WHEN (NEW.state IN ('completed', 'dead', 'cancelled')
                       AND OLD.state NOT IN ('completed', 'dead', 'cancelled')
                       AND current_setting('animus.audit_mode', true) IS DISTINCT FROM 'statement')
    EXECUTE FUNCTION animus.work_item_wake_parents();
DROP TRIGGER work_items_wake_parents ON animus.work_items;
CREATE TRIGGER work_items_wake_parents AFTER UPDATE ON animus.work_items
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (current_setting('animus.audit_mode', true) = 'statement')
    EXECUTE FUNCTION animus.work_items_wake_parents();

-- As in 0019 and 0010 (with the attributes 0012 gave them), and: a batch is audited by
-- statement.
CREATE OR REPLACE FUNCTION animus.claim(p_queue text, p_qty int, p_vt_seconds int,
                                        p_work_types text[], p_start bool)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
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
    PERFORM animus.audit_by_statement(cardinality(v_ids));
    RETURN QUERY SELECT * FROM animus.take_queued(v_ids, v_msgs, v_reads, v_ids, p_start);
    GET DIAGNOSTICS v_claimed = ROW_COUNT;
    PERFORM animus.audit_by_statement(0);
    IF v_claimed = cardinality(v_ids) THEN
        RETURN;
    END IF;

    -- Messages left over: their item's timer ran out (waiting), its lease expired (claimed
    -- or running), it failed and waits for a retry, it finished, or it is missing. Items
    -- claimed just above are not among them (whichever of their messages they were claimed
    -- through).
    SELECT array_agg(c.id) INTO v_stale
      FROM unnest(v_ids) AS c(id)
      LEFT JOIN animus.work_items w ON w.id = c.id
     WHERE w.id IS NULL
        OR NOT EXISTS (SELECT 1 FROM unnest(v_msgs, v_reads) AS m(msg_id, read_ct)
                        WHERE m.msg_id = w.msg_id AND m.read_ct = w.lease);

    UPDATE animus.work_items w
       SET state = 'queued', updated_at = now(), reason = animus.timer_woke(w.wait)
     WHERE w.id = ANY (v_stale) AND w.state = 'waiting';
    UPDATE animus.work_items w
       SET state = 'queued', reason = 'lease expired before the focus started',
           updated_at = now()
     WHERE w.id = ANY (v_stale) AND w.state = 'claimed';
    WITH lost AS (
        UPDATE animus.work_items w
           SET state = 'failed', outcome_error = 'lease expired while running (engine lost)',
               reason = 'lease expired while running (engine lost)', updated_at = now()
         WHERE w.id = ANY (v_stale) AND w.state = 'running'
        RETURNING w.id, w.attempts, w.work_type, w.outcome_error)
    INSERT INTO animus.execution_records (work_id, attempt, result, work_type, error,
                                          started_at)
    SELECT l.id, l.attempts, 'lost', l.work_type, l.outcome_error,
           coalesce((SELECT max(a.at) FROM animus.audit_log a
                      WHERE a.work_id = l.id AND a.event = 'running'), now())
      FROM lost l
     WHERE NOT EXISTS (SELECT 1 FROM animus.execution_records r
                        WHERE r.work_id = l.id AND r.attempt = l.attempts);
    UPDATE animus.work_items w
       SET state = CASE WHEN w.attempts - w.suspensions < w.max_attempts THEN 'queued'
                        ELSE 'dead' END::animus.work_state,
           reason = CASE WHEN w.attempts - w.suspensions < w.max_attempts
                         THEN 'retry after: ' || coalesce(w.outcome_error, 'failure')
                         ELSE 'attempts exhausted (' || (w.attempts - w.suspensions) || '/'
                              || w.max_attempts || '): ' || coalesce(w.outcome_error, 'failure')
                         END,
           resolved_at = CASE WHEN w.attempts - w.suspensions < w.max_attempts THEN NULL
                              ELSE now() END,
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

-- As in 0017, in one statement of the queue's table where it can: the item's message, unless
-- an engine holds it locked this moment, is made visible at once and engines are told (one
-- dynamic statement instead of three, pgmq.set_vt's among them).
CREATE OR REPLACE FUNCTION animus.wake_message(p_item animus.work_items) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_free bigint;
    v_held bool;
BEGIN
    IF p_item.msg_id IS NOT NULL THEN
        EXECUTE format($q$
            UPDATE pgmq.%1$I m SET vt = clock_timestamp()
             WHERE m.msg_id = (SELECT f.msg_id FROM pgmq.%1$I f WHERE f.msg_id = $1
                                  FOR UPDATE SKIP LOCKED)
            RETURNING m.msg_id$q$, 'q_' || p_item.queue) INTO v_free USING p_item.msg_id;
        IF v_free IS NOT NULL THEN
            PERFORM pg_notify('animus_work', json_build_object(
                        'queue', p_item.queue,
                        'work_types', json_build_array(p_item.work_type))::text);
            RETURN;
        END IF;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM pgmq.%I WHERE msg_id = $1)',
                       'q_' || p_item.queue) INTO v_held USING p_item.msg_id;
        IF v_held THEN  -- an engine is claiming it: the claim finds the item queued
            RETURN;
        END IF;
    END IF;
    PERFORM animus.requeue_message(p_item, 0);  -- no message left: a new one
END
$$;

REVOKE EXECUTE ON FUNCTION animus.audit_by_statement(int), animus.work_item_updated(),
    animus.work_item_wake_parents() FROM PUBLIC;

