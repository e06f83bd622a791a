-- A claim takes the first visible messages in priority order, and the queue's index on
-- (priority DESC, msg_id) gives that order: walked, it stops after the few it takes. But the
-- planner could not estimate how many messages `message->>'t' = ANY (...)` keeps (JSON, no
-- statistics: it guessed 0.5%), so with a backlog it chose to read and sort the whole queue
-- instead (14 ms at 12,000 messages, against 0.1 ms by the index), on every claim.
-- Statistics on the work type of each queue's messages (kept fresh by autovacuum's analyze)
-- let it see that the filter keeps most of them.
CREATE FUNCTION animus.queue_statistics(p_queue text) RETURNS void
    LANGUAGE plpgsql
AS $$
BEGIN
    EXECUTE format('CREATE STATISTICS IF NOT EXISTS pgmq.%I ON ((message->>''t'')) FROM pgmq.%I',
                   'q_' || p_queue || '_type', 'q_' || p_queue);
EXCEPTION WHEN insufficient_privilege THEN  -- a queue made by someone else: claims still work
    RAISE NOTICE 'no statistics on the work types of queue %: %', p_queue, SQLERRM;
END
$$;
REVOKE ALL ON FUNCTION animus.queue_statistics(text) FROM PUBLIC;

SELECT animus.queue_statistics(queue_name) FROM pgmq.meta;

-- New queues get them too. `animus roles setup` makes create_queue a SECURITY DEFINER
-- function: replacing it keeps that (as 0010_lean_claim.sql does).
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
    PERFORM animus.queue_statistics(p_queue);
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
