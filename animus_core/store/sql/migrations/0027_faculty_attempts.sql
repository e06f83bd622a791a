-- A faculty's max_attempts overrides the item's own (RetryPolicy), but the row kept the
-- item's: `animus work show` printed 5/3 for an item dead after "attempts exhausted (5/5)",
-- and a lease lost while running was judged against 3 by the database. An engine now claims
-- with its faculties' limits by work type, and the claim writes the limit that applies into
-- the item (audited, as any change of a column, with its old and new value).

CREATE FUNCTION animus.claim(p_queue text, p_qty int, p_vt_seconds int, p_work_types text[],
                             p_start bool, p_max_attempts jsonb)
RETURNS SETOF animus.work_items
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_claimed animus.work_items[];
BEGIN
    SELECT array_agg(c) INTO v_claimed
      FROM animus.claim(p_queue, p_qty, p_vt_seconds, p_work_types, p_start) AS c;
    IF v_claimed IS NULL THEN
        RETURN;
    END IF;
    IF p_max_attempts IS NULL OR p_max_attempts = '{}' THEN
        RETURN QUERY SELECT * FROM unnest(v_claimed);
        RETURN;
    END IF;
    RETURN QUERY
        WITH fixed AS (
            UPDATE animus.work_items w
               SET max_attempts = (p_max_attempts->>w.work_type)::int
              FROM unnest(v_claimed) AS c
             WHERE w.id = c.id AND p_max_attempts ? w.work_type
               AND w.max_attempts IS DISTINCT FROM (p_max_attempts->>w.work_type)::int
            RETURNING w.*)
        SELECT f.* FROM fixed f
        UNION ALL
        SELECT c.* FROM unnest(v_claimed) AS c
         WHERE NOT EXISTS (SELECT 1 FROM fixed f WHERE f.id = c.id);
END
$$;

REVOKE EXECUTE ON FUNCTION animus.claim(text, int, int, text[], bool, jsonb) FROM PUBLIC;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_operator') THEN
        GRANT EXECUTE ON FUNCTION animus.claim(text, int, int, text[], bool, jsonb)
           TO animus_operator;
    END IF;
END
$$;
