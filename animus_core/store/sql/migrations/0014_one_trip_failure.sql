-- A failed attempt is one call and one transaction, as a completion is: record the failure
-- (running -> failed, with the attempt's execution record and its model usage), then retry
-- or dead-letter it. The moves are the checked functions of 0012, called in turn: the lease
-- is checked, each transition is checked (and checked again by the trigger), and every
-- change is audited in the same transaction. Nothing is left failed between two calls.

-- Append one execution record, given as the JSON of animus_core.values.records.ExecutionRecord.
CREATE FUNCTION animus.record_execution(p_execution jsonb) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO animus.execution_records (work_id, attempt, result, work_type, params_hash,
                                          faculty, faculty_hash, engine_version,
                                          environment_hash, models, outcome_hash, error,
                                          started_at)
    SELECT r.work_id, r.attempt, r.result, r.work_type, r.params_hash, r.faculty,
           r.faculty_hash, r.engine_version, r.environment_hash, r.models, r.outcome_hash,
           r.error, r.started_at
      FROM jsonb_populate_record(NULL::animus.execution_records, p_execution) r
     WHERE p_execution IS NOT NULL
$$;

-- running -> failed, then failed -> queued visible after p_retry_delay seconds, or, when
-- p_retry_delay is NULL, failed -> dead; p_reason is the reason of that second move.
-- p_usage (as for add_usage) is added to the item's totals first.
CREATE FUNCTION animus.fail_attempt(p_id uuid, p_msg_id bigint, p_lease int, p_error text,
                                    p_duration_ms bigint, p_execution jsonb, p_usage jsonb,
                                    p_retry_delay float8, p_reason text)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM animus.held_item(p_id, p_msg_id, p_lease);  -- a lost lease changes nothing
    IF p_usage IS NOT NULL THEN
        PERFORM animus.add_usage(p_id, p_usage);
    END IF;
    PERFORM animus.fail(p_id, p_msg_id, p_lease, p_error, p_duration_ms);
    PERFORM animus.record_execution(p_execution);
    IF p_retry_delay IS NULL THEN
        RETURN QUERY SELECT (d.item).* FROM animus.dead_letter(p_id, p_reason) d;
    ELSE
        RETURN QUERY SELECT * FROM animus.retry(p_id, p_retry_delay, p_reason);
    END IF;
END
$$;

-- A requested cancellation stopped the attempt: running -> failed -> dead, the reason being
-- the request ('cancelled while running: <request>', cut to p_reason_chars characters as
-- animus_core.values.limits.clip cuts), which is also the execution record's error.
CREATE FUNCTION animus.cancel_attempt(p_id uuid, p_msg_id bigint, p_lease int,
                                      p_duration_ms bigint, p_execution jsonb,
                                      p_reason_chars int)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
    v_reason text := format('cancelled while %s: %s', v_item.state,
                            coalesce(v_item.cancel_requested, 'by request'));
BEGIN
    IF length(v_reason) > p_reason_chars THEN
        v_reason := format('%s [... %s more characters cut]', left(v_reason, p_reason_chars - 40),
                           length(v_reason) - (p_reason_chars - 40));
    END IF;
    PERFORM animus.fail(p_id, p_msg_id, p_lease, v_reason, p_duration_ms);
    IF p_execution IS NOT NULL THEN
        PERFORM animus.record_execution(jsonb_set(p_execution, '{error}', to_jsonb(v_reason)));
    END IF;
    RETURN QUERY SELECT (d.item).* FROM animus.dead_letter(p_id, v_reason) d;
END
$$;

-- New functions are callable by PUBLIC until revoked: revoke at once, and on a database whose
-- roles are set up already grant the two moves to operators now (animus roles setup does
-- it from now on).
REVOKE EXECUTE ON FUNCTION
    animus.record_execution(jsonb),
    animus.fail_attempt(uuid, bigint, int, text, bigint, jsonb, jsonb, float8, text),
    animus.cancel_attempt(uuid, bigint, int, bigint, jsonb, int)
  FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_operator') THEN
        GRANT EXECUTE ON FUNCTION
            animus.fail_attempt(uuid, bigint, int, text, bigint, jsonb, jsonb, float8, text),
            animus.cancel_attempt(uuid, bigint, int, bigint, jsonb, int)
          TO animus_operator;
    END IF;
END
$$;
