-- A queue's claim finds the messages it leases by their ids, whatever the table's
-- statistics said when its plan was made.
--
-- The claim's update joined the messages it took (a few) with the queue table. Each session
-- keeps one plan of it (0040); made while the statistics said the queue was empty (after a
-- vacuum of a drained queue, or on a new one), that plan read the whole queue through its
-- primary key and compared every message with every one taken: with 10,000 messages ready,
-- 100 ms a claim instead of 4, until a later analyze made the session plan again (an engine
-- woken by 10,000 signals resumed them in 8-12 s instead of 4). The update now looks its
-- messages up by id (an index condition), which no statistics can turn into a scan.

CREATE OR REPLACE FUNCTION animus.queue_functions(p_queue text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_q text := 'q_' || p_queue;
    v_columns text;
BEGIN
    -- the columns both tables have (they differ between versions of pgmq)
    SELECT string_agg(quote_ident(q.attname), ', ' ORDER BY q.attnum) INTO v_columns
      FROM pg_attribute q
      JOIN pg_attribute a ON a.attname = q.attname AND NOT a.attisdropped
                         AND a.attrelid = format('pgmq.%I', 'a_' || p_queue)::regclass
     WHERE q.attrelid = format('pgmq.%I', v_q)::regclass AND q.attnum > 0
       AND NOT q.attisdropped;
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_qty int, p_work_types text[],
                                               p_vt_seconds int, p_now timestamptz,
                                               OUT msg_ids bigint[], OUT read_cts int[],
                                               OUT ids uuid[])
        LANGUAGE plpgsql SET enable_sort = off SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $b$
        BEGIN
            WITH taken AS (
                SELECT m.msg_id FROM pgmq.%2$I m
                 WHERE m.vt <= p_now
                   AND (p_work_types IS NULL OR m.message->>'t' = ANY (p_work_types))
                 ORDER BY ((m.message->>'p')::int) DESC, m.vt, m.msg_id
                 LIMIT p_qty
                 FOR UPDATE SKIP LOCKED
            ), leased AS (
                UPDATE pgmq.%2$I m
                   SET last_read_at = clock_timestamp(),
                       vt = clock_timestamp() + make_interval(secs => p_vt_seconds),
                       read_ct = m.read_ct + 1
                 WHERE m.msg_id = ANY (ARRAY(SELECT t.msg_id FROM taken t))
                RETURNING m.msg_id, m.read_ct, (m.message->>'id')::uuid AS id
            )
            SELECT array_agg(l.msg_id), array_agg(l.read_ct), array_agg(l.id)
              INTO msg_ids, read_cts, ids FROM leased l;
        END
        $b$$f$, v_q || '_claim', v_q);
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_msg_ids bigint[]) RETURNS void
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $b$
        BEGIN
            WITH gone AS (DELETE FROM pgmq.%2$I WHERE msg_id = ANY (p_msg_ids) RETURNING %4$s)
            INSERT INTO pgmq.%3$I (%4$s) SELECT %4$s FROM gone;
        END
        $b$$f$, v_q || '_archive', v_q, 'a_' || p_queue, v_columns);
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_msg_id bigint, p_at timestamptz,
                                               p_skip_locked bool) RETURNS text
        LANGUAGE plpgsql SET plan_cache_mode = force_generic_plan SET enable_seqscan = off AS $b$
        BEGIN
            IF p_skip_locked THEN
                UPDATE pgmq.%2$I m SET vt = p_at
                 WHERE m.msg_id = (SELECT f.msg_id FROM pgmq.%2$I f WHERE f.msg_id = p_msg_id
                                      FOR UPDATE SKIP LOCKED);
                IF FOUND THEN
                    RETURN 'moved';
                END IF;
                RETURN CASE WHEN EXISTS (SELECT 1 FROM pgmq.%2$I f WHERE f.msg_id = p_msg_id)
                            THEN 'held' ELSE 'missing' END;
            END IF;
            UPDATE pgmq.%2$I m SET vt = p_at WHERE m.msg_id = p_msg_id;
            RETURN CASE WHEN FOUND THEN 'moved' ELSE 'missing' END;
        END
        $b$$f$, v_q || '_set_vt', v_q);
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION animus.%1$I(p_message jsonb, p_at timestamptz) RETURNS bigint
        LANGUAGE sql AS $b$
            INSERT INTO pgmq.%2$I (vt, message) VALUES (p_at, p_message) RETURNING msg_id
        $b$$f$, v_q || '_send', v_q);
    EXECUTE format('REVOKE ALL ON FUNCTION animus.%I(int, text[], int, timestamptz) FROM PUBLIC',
                   v_q || '_claim');
    EXECUTE format('REVOKE ALL ON FUNCTION animus.%I(bigint[]) FROM PUBLIC', v_q || '_archive');
    EXECUTE format('REVOKE ALL ON FUNCTION animus.%I(bigint, timestamptz, bool) FROM PUBLIC',
                   v_q || '_set_vt');
    EXECUTE format('REVOKE ALL ON FUNCTION animus.%I(jsonb, timestamptz) FROM PUBLIC',
                   v_q || '_send');
END
$fn$;

SELECT animus.queue_functions(queue_name) FROM pgmq.meta
 WHERE to_regclass(format('pgmq.%I', 'q_' || queue_name || '_ready')) IS NOT NULL;
