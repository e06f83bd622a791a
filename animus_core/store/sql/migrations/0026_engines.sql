-- Live engines: each engine registers as it starts (its id, host, pid, version, options, the
-- faculties it loaded with their origin and those it disabled with the reason, its schedules)
-- and beats every heartbeat_seconds with its running foci per faculty and its schedules'
-- next ticks. An engine that stops cleanly deregisters (its row goes); one whose beats
-- stopped for three intervals is lost, and shown so, until a day later an engine that
-- registers forgets it.
--
-- An operator asks engines to stop through the database (animus.stop_engines): the request
-- is written in their rows, with who asked and the grace period, and a notification on
-- animus_engines tells them to look. Anyone may NOTIFY: an engine acts on the request in its
-- row, never on a notification alone.

CREATE TABLE animus.engines (
    id uuid PRIMARY KEY,
    host text NOT NULL,
    pid int NOT NULL,
    version text NOT NULL,
    db_user text NOT NULL DEFAULT session_user,
    started_at timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now(),
    heartbeat_seconds float8 NOT NULL CHECK (heartbeat_seconds > 0),
    concurrency int NOT NULL CHECK (concurrency > 0),
    queues text[] NOT NULL,
    -- [{"name", "origin", "accepts": [...], "max_concurrent"}]
    faculties jsonb NOT NULL DEFAULT '[]',
    -- {"faculty name": "why it is disabled"}
    disabled jsonb NOT NULL DEFAULT '{}',
    -- {"faculty name": foci running now}
    running jsonb NOT NULL DEFAULT '{}',
    -- [{"name", "work_type", "next_tick"}]
    schedules jsonb NOT NULL DEFAULT '[]',
    stop_requested_at timestamptz,
    stop_requested_by text,
    stop_grace float8
);

-- Whether an engine's heartbeat lapsed (three beats missed).
CREATE FUNCTION animus.engine_lost(p_engine animus.engines) RETURNS bool
LANGUAGE sql STABLE AS $$
    SELECT p_engine.last_seen < now() - make_interval(secs => 3 * p_engine.heartbeat_seconds)
$$;

CREATE FUNCTION animus.engine_register(p_id uuid, p_host text, p_pid int, p_version text,
                                       p_heartbeat float8, p_concurrency int,
                                       p_queues text[], p_faculties jsonb, p_disabled jsonb,
                                       p_schedules jsonb)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM animus.engines e WHERE e.last_seen < now() - interval '1 day';
    INSERT INTO animus.engines AS e (id, host, pid, version, heartbeat_seconds, concurrency,
                                     queues, faculties, disabled, schedules)
    VALUES (p_id, p_host, p_pid, p_version, p_heartbeat, p_concurrency, p_queues,
            coalesce(p_faculties, '[]'), coalesce(p_disabled, '{}'),
            coalesce(p_schedules, '[]'))
    ON CONFLICT (id) DO UPDATE
       SET host = excluded.host, pid = excluded.pid, version = excluded.version,
           db_user = session_user, last_seen = now(),
           heartbeat_seconds = excluded.heartbeat_seconds,
           concurrency = excluded.concurrency, queues = excluded.queues,
           faculties = excluded.faculties, disabled = excluded.disabled,
           schedules = excluded.schedules;
END
$$;

-- A beat: returns whether the engine is registered (false: register again) and, when an
-- operator asked it to stop, the grace period asked for (NaN: the engine's own).
CREATE FUNCTION animus.engine_heartbeat(p_id uuid, p_running jsonb, p_schedules jsonb)
RETURNS TABLE (registered bool, stop_requested bool, stop_grace float8)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN QUERY
        UPDATE animus.engines e
           SET last_seen = now(), running = coalesce(p_running, '{}'),
               schedules = coalesce(p_schedules, e.schedules)
         WHERE e.id = p_id
        RETURNING true, e.stop_requested_at IS NOT NULL, e.stop_grace;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, false, NULL::float8;
    END IF;
END
$$;

CREATE FUNCTION animus.engine_deregister(p_id uuid) RETURNS void
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM animus.engines WHERE id = p_id
$$;

-- Ask one engine (p_engine) or every live engine (NULL) to drain and stop, within p_grace
-- seconds (NULL: each engine's own grace period). Returns the engines asked. A lost engine
-- is not asked (nothing would answer); an unknown id raises.
CREATE FUNCTION animus.stop_engines(p_engine uuid, p_grace float8)
RETURNS SETOF uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_ids uuid[];
BEGIN
    IF p_grace IS NOT NULL AND NOT (p_grace >= 0 AND p_grace <= 86400) THEN
        RAISE EXCEPTION 'a grace period is from 0 to 86400 seconds, got %', p_grace
            USING ERRCODE = '22023';
    END IF;
    IF p_engine IS NOT NULL AND NOT EXISTS (SELECT 1 FROM animus.engines WHERE id = p_engine)
    THEN
        RAISE EXCEPTION 'no engine with id % is registered (animus status lists them)',
            p_engine USING ERRCODE = 'ANI04';
    END IF;
    WITH asked AS (
        UPDATE animus.engines e
           SET stop_requested_at = now(), stop_requested_by = session_user,
               stop_grace = p_grace
         WHERE (p_engine IS NULL OR e.id = p_engine) AND NOT animus.engine_lost(e)
        RETURNING e.id)
    SELECT array_agg(id ORDER BY id) INTO v_ids FROM asked;
    PERFORM pg_notify('animus_engines', x::text) FROM unnest(v_ids) AS x;
    RETURN QUERY SELECT unnest(coalesce(v_ids, '{}'));
END
$$;

-- The read model of `animus status`, in one query: engines (with whether each is lost),
-- queues (depth and oldest message; pgmq's tables are read as their owner, so the reader
-- role needs no rights on their sequences), live work by type and state with the oldest
-- queued item's age, the latest dead letters, waiting items by kind and the first to wake,
-- and each schedule's latest tick.
CREATE FUNCTION animus.status_view(p_dead int, p_waiting int) RETURNS jsonb
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_queues jsonb := '[]';
    q record;
    v_depth bigint;
    v_oldest int;
BEGIN
    FOR q IN SELECT queue_name FROM pgmq.meta ORDER BY queue_name LOOP
        EXECUTE format('SELECT count(*), extract(epoch FROM now() - min(enqueued_at))::int
                          FROM pgmq.%I', 'q_' || q.queue_name) INTO v_depth, v_oldest;
        v_queues := v_queues || jsonb_build_object('queue', q.queue_name, 'depth', v_depth,
                                                   'oldest_seconds', v_oldest);
    END LOOP;
    RETURN jsonb_build_object(
        'now', now(),
        'engines', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'id', e.id, 'host', e.host, 'pid', e.pid, 'version', e.version,
                       'db_user', e.db_user, 'started_at', e.started_at,
                       'last_seen', e.last_seen, 'heartbeat_seconds', e.heartbeat_seconds,
                       'lost', animus.engine_lost(e), 'concurrency', e.concurrency,
                       'queues', to_jsonb(e.queues), 'faculties', e.faculties,
                       'disabled', e.disabled, 'running', e.running,
                       'schedules', e.schedules,
                       'stop_requested_at', e.stop_requested_at,
                       'stop_requested_by', e.stop_requested_by)
                   ORDER BY e.started_at, e.id)
              FROM animus.engines e), '[]'),
        'queues', v_queues,
        'work', coalesce((
            SELECT jsonb_agg(jsonb_build_object('work_type', c.work_type, 'state', c.state,
                                                'n', c.n, 'oldest', c.oldest)
                             ORDER BY c.work_type, c.state)
              FROM (SELECT work_type, state::text AS state, count(*) AS n,
                           min(created_at) AS oldest
                      FROM animus.work_items
                     WHERE state NOT IN ('completed', 'merged', 'cancelled')
                     GROUP BY 1, 2) c), '[]'),
        'dead', coalesce((
            SELECT jsonb_agg(jsonb_build_object('id', d.id, 'work_type', d.work_type,
                                                'reason', d.reason,
                                                'resolved_at', d.resolved_at)
                             ORDER BY d.resolved_at DESC NULLS LAST)
              FROM (SELECT id, work_type, reason, resolved_at FROM animus.work_items
                     WHERE state = 'dead' ORDER BY resolved_at DESC NULLS LAST
                     LIMIT p_dead) d), '[]'),
        'waiting', coalesce((
            SELECT jsonb_agg(jsonb_build_object('kind', k.kind, 'n', k.n,
                                                'next_wake_at', k.next_wake_at)
                             ORDER BY k.kind)
              FROM (SELECT coalesce(wait->>'kind', '?') AS kind, count(*) AS n,
                           min(wake_at) AS next_wake_at
                      FROM animus.work_items WHERE state = 'waiting' GROUP BY 1) k), '[]'),
        'next_waking', coalesce((
            SELECT jsonb_agg(jsonb_build_object('id', w.id, 'work_type', w.work_type,
                                                'wait', w.wait, 'wake_at', w.wake_at,
                                                'reason', w.reason)
                             ORDER BY w.wake_at NULLS LAST, w.updated_at)
              FROM (SELECT id, work_type, wait, wake_at, reason, updated_at
                      FROM animus.work_items WHERE state = 'waiting'
                     ORDER BY wake_at NULLS LAST, updated_at LIMIT p_waiting) w), '[]'),
        'schedules', coalesce((
            SELECT jsonb_agg(jsonb_build_object('name', t.name, 'last_tick', t.tick,
                                                'work_type', w.work_type) ORDER BY t.name)
              FROM (SELECT DISTINCT ON (name) name, tick, work_id FROM animus.schedule_ticks
                     ORDER BY name, tick DESC) t
              LEFT JOIN animus.work_items w ON w.id = t.work_id), '[]'));
END
$$;

REVOKE EXECUTE ON FUNCTION
    animus.engine_lost(animus.engines),
    animus.engine_register(uuid, text, int, text, float8, int, text[], jsonb, jsonb, jsonb),
    animus.engine_heartbeat(uuid, jsonb, jsonb),
    animus.engine_deregister(uuid),
    animus.stop_engines(uuid, float8),
    animus.status_view(int, int)
  FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_operator') THEN
        GRANT EXECUTE ON FUNCTION
            animus.engine_register(uuid, text, int, text, float8, int, text[], jsonb, jsonb,
                                   jsonb),
            animus.engine_heartbeat(uuid, jsonb, jsonb),
            animus.engine_deregister(uuid),
            animus.stop_engines(uuid, float8)
          TO animus_operator;
        GRANT EXECUTE ON FUNCTION animus.engine_lost(animus.engines),
                                  animus.status_view(int, int)
          TO animus_reader;
        GRANT SELECT ON animus.engines TO animus_reader;
    END IF;
END
$$;
