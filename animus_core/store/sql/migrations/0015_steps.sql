-- Durable steps: `await focus.step(name, fn)` runs fn once per work item. Its result is
-- recorded here when it returns, by the holder of the item's lease only, with an audit row in
-- the same transaction; every later attempt of the item replays it instead of running fn.
-- A step is known by its position in the focus (the n-th step call) and its name.
--
-- Steps go with their item (`animus purge`: ON DELETE CASCADE) and never change.

CREATE TABLE animus.steps (
    work_id     uuid NOT NULL REFERENCES animus.work_items (id) ON DELETE CASCADE,
    position    int NOT NULL CHECK (position >= 1),
    name        text NOT NULL,
    attempt     int NOT NULL,          -- the attempt that ran it
    result      jsonb,
    result_hash text NOT NULL,         -- canonical hash (RFC 8785, NFC) of the result
    started_at  timestamptz NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    duration_ms bigint NOT NULL,
    copied_from uuid,                  -- recorded by another item (rerun --from-step)
    PRIMARY KEY (work_id, position)
);

CREATE TRIGGER steps_append_only BEFORE UPDATE ON animus.steps
    FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();
CREATE TRIGGER steps_no_truncate BEFORE TRUNCATE ON animus.steps
    FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

-- Which steps each attempt ran and which it replayed ({"ran": [...], "replayed": [...]}).
ALTER TABLE animus.execution_records ADD COLUMN steps jsonb;

CREATE OR REPLACE FUNCTION animus.record_execution(p_execution jsonb) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO animus.execution_records (work_id, attempt, result, work_type, params_hash,
                                          faculty, faculty_hash, engine_version,
                                          environment_hash, models, outcome_hash, error,
                                          started_at, steps)
    SELECT r.work_id, r.attempt, r.result, r.work_type, r.params_hash, r.faculty,
           r.faculty_hash, r.engine_version, r.environment_hash, r.models, r.outcome_hash,
           r.error, r.started_at, r.steps
      FROM jsonb_populate_record(NULL::animus.execution_records, p_execution) r
     WHERE p_execution IS NOT NULL
$$;

-- Record step p_position (p_name) of the running attempt that holds the lease: a lost lease
-- raises (ANI02) and records nothing. The audit row carries the step's name, position,
-- attempt, result hash and duration (not the result).
CREATE FUNCTION animus.record_step(p_id uuid, p_msg_id bigint, p_lease int, p_position int,
                                   p_name text, p_result jsonb, p_result_hash text,
                                   p_started_at timestamptz, p_duration_ms bigint)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.held_item(p_id, p_msg_id, p_lease);
    v_known text;
BEGIN
    IF v_item.state <> 'running' THEN
        RAISE EXCEPTION 'work item % is %: only a running attempt records steps',
            p_id, v_item.state USING ERRCODE = 'ANI01';
    END IF;
    SELECT s.name INTO v_known FROM animus.steps s
     WHERE s.work_id = p_id AND s.position = p_position;
    IF FOUND THEN
        RAISE EXCEPTION 'step % of work item % is recorded already (as %)',
            p_position, p_id, quote_literal(v_known) USING ERRCODE = 'ANI01';
    END IF;
    INSERT INTO animus.steps (work_id, position, name, attempt, result, result_hash,
                              started_at, duration_ms)
    VALUES (p_id, p_position, p_name, v_item.attempts, p_result, p_result_hash, p_started_at,
            p_duration_ms);
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (p_id, 'step', v_item.state, v_item.state,
            JSON_OBJECT('source': v_item.source, 'actor': animus.actor()
                        ABSENT ON NULL RETURNING jsonb),
            jsonb_build_object('position', p_position, 'name', p_name,
                               'attempt', v_item.attempts, 'result_hash', p_result_hash,
                               'duration_ms', p_duration_ms));
END
$$;

-- Copy the steps of p_from recorded before the first step named p_before into p_to, a rerun
-- or replay of it (replay_of) that the caller submitted in this transaction and that has not
-- run yet: its first attempt replays them and runs p_before and what follows afresh.
-- Returns how many steps were copied; audited as `steps_copied` on p_to.
CREATE FUNCTION animus.copy_steps(p_to uuid, p_from uuid, p_before text)
RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_item animus.work_items := animus.lock_item(p_to);
    v_position int;
    v_names text;
    v_count int;
BEGIN
    IF v_item.replay_of IS DISTINCT FROM p_from THEN
        RAISE EXCEPTION 'work item % is not a rerun or replay of %: its steps cannot be copied',
            p_to, p_from USING ERRCODE = 'ANI03';
    END IF;
    IF v_item.requested_by IS DISTINCT FROM session_user THEN
        RAISE EXCEPTION '% did not submit work item %: only its submitter copies steps into it',
            session_user, p_to USING ERRCODE = 'ANI03';
    END IF;
    IF v_item.attempts > 0 OR v_item.created_at <> now()
       OR EXISTS (SELECT 1 FROM animus.steps s WHERE s.work_id = p_to) THEN
        RAISE EXCEPTION 'work item % was not submitted in this transaction, or has run: '
                        'steps are copied only into the item as it is submitted', p_to
            USING ERRCODE = 'ANI01';
    END IF;
    SELECT min(s.position) INTO v_position FROM animus.steps s
     WHERE s.work_id = p_from AND s.name = p_before;
    IF v_position IS NULL THEN
        SELECT string_agg(quote_literal(s.name), ', ' ORDER BY s.position) INTO v_names
          FROM animus.steps s WHERE s.work_id = p_from;
        RAISE EXCEPTION 'work item % has no recorded step named %: its steps are %',
            p_from, quote_literal(p_before), coalesce(v_names, 'none')
            USING ERRCODE = 'ANI04';
    END IF;
    INSERT INTO animus.steps (work_id, position, name, attempt, result, result_hash,
                              started_at, finished_at, duration_ms, copied_from)
    SELECT p_to, s.position, s.name, s.attempt, s.result, s.result_hash, s.started_at,
           s.finished_at, s.duration_ms, coalesce(s.copied_from, p_from)
      FROM animus.steps s
     WHERE s.work_id = p_from AND s.position < v_position;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    INSERT INTO animus.audit_log (work_id, event, from_state, to_state, provenance, payload)
    VALUES (p_to, 'steps_copied', v_item.state, v_item.state,
            JSON_OBJECT('source': v_item.source, 'actor': animus.actor()
                        ABSENT ON NULL RETURNING jsonb),
            jsonb_build_object('from', p_from, 'before', p_before, 'steps', v_count));
    RETURN v_count;
END
$$;

-- New functions are callable by PUBLIC until revoked: revoke at once, and on a database whose
-- roles are set up already grant them now (animus roles setup does it from now on).
REVOKE EXECUTE ON FUNCTION
    animus.record_step(uuid, bigint, int, int, text, jsonb, text, timestamptz, bigint),
    animus.copy_steps(uuid, uuid, text)
  FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_operator') THEN
        GRANT EXECUTE ON FUNCTION
            animus.record_step(uuid, bigint, int, int, text, jsonb, text, timestamptz, bigint)
          TO animus_operator;
        GRANT EXECUTE ON FUNCTION animus.copy_steps(uuid, uuid, text) TO animus_submitter;
        GRANT SELECT ON animus.steps TO animus_reader;
    END IF;
END
$$;
