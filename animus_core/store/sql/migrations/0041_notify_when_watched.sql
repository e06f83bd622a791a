-- Work changes notify animus_changed only while a console watches.
--
-- Every statement that inserted or updated work items notified animus_changed, for the
-- console's live pages (0031), with or without a console. A notifying transaction takes a
-- lock of the whole server at its commit, held through the commit's flush, and wakes every
-- listening backend of the database (each engine's listener among them): claims and
-- completions of several engines committed one after another instead of together (8
-- connections updating a row each: about 9,000 commits/s without a notification, 3,000 to
-- 5,900 with one). A console now says it watches, in animus.watchers, and says so again
-- before its entry runs out; the notification is sent while an entry has not.

CREATE TABLE animus.watchers (
    name  text PRIMARY KEY,
    until timestamptz NOT NULL
);
REVOKE ALL ON animus.watchers FROM PUBLIC;

-- Watch for p_seconds from now (0: stop watching); entries run out by themselves.
CREATE FUNCTION animus.watch(p_name text, p_seconds int) RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM animus.watchers WHERE until <= now() OR (name = p_name AND p_seconds <= 0);
    INSERT INTO animus.watchers (name, until)
    SELECT p_name, now() + make_interval(secs => p_seconds) WHERE p_seconds > 0
        ON CONFLICT (name) DO UPDATE SET until = EXCLUDED.until;
$$;
REVOKE EXECUTE ON FUNCTION animus.watch(text, int) FROM PUBLIC;

CREATE OR REPLACE FUNCTION animus.notify_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM animus.watchers WHERE until > now()) THEN
        PERFORM pg_notify('animus_changed', '');
    END IF;
    RETURN NULL;
END
$$;
