-- What a fleet of engines scales on (KEDA's PostgreSQL scaler runs it: docs/
-- operations-kubernetes.md): in queue p_queue, the items of p_work_types (NULL: of any type)
-- an engine could start now, plus those engines hold (claimed or running). Not counted:
-- waiting items (their messages are hidden until their timer, or gone until a signal), items
-- whose retry or start is due later, and items of other types (pass the types your engines
-- accept, so that work nobody runs does not start engines that would not run it either).
-- Counting the held items keeps busy engines: a fleet whose queue is empty but whose engines
-- are all busy needs as many engines as it has.
CREATE FUNCTION animus.scaling_depth(p_queue text DEFAULT 'work',
                                     p_work_types text[] DEFAULT NULL) RETURNS bigint
    LANGUAGE plpgsql STABLE SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ready bigint;
    v_held bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = p_queue) THEN
        RAISE EXCEPTION 'animus.scaling_depth: there is no queue %', quote_literal(p_queue)
            USING ERRCODE = '22023',
                  HINT = 'name a queue engines serve: work, unless they run with --queue';
    END IF;
    EXECUTE format('SELECT count(*) FROM pgmq.%I WHERE vt <= clock_timestamp() '
                   'AND ($1::text[] IS NULL OR message->>''t'' = ANY ($1))', 'q_' || p_queue)
       INTO v_ready USING p_work_types;
    SELECT count(*) INTO v_held
      FROM animus.work_items w
     WHERE w.state IN ('claimed', 'running') AND w.queue = p_queue
       AND (p_work_types IS NULL OR w.work_type = ANY (p_work_types));
    RETURN v_ready + v_held;
END
$$;
REVOKE ALL ON FUNCTION animus.scaling_depth(text, text[]) FROM PUBLIC;
