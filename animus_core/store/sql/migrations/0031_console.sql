-- The web console (`animus web`).
--
-- Its people: each is a database login role, a member of one animus group role, which the
-- console signs in as for every query and action of that person, so the database enforces
-- what the role may do and the audit records the person (session_user). The console checks
-- a person's password against an argon2id hash kept here; the role's own database password
-- is derived from the console's secret, never stored.
CREATE TABLE animus.console_users (
    name          text PRIMARY KEY,
    role          text NOT NULL
                  CHECK (role IN ('reader', 'submitter', 'approver', 'operator', 'admin')),
    password_hash text NOT NULL CHECK (password_hash LIKE '$argon2id$%'),
    created_at    timestamptz NOT NULL DEFAULT now(),
    created_by    text NOT NULL DEFAULT session_user
);
REVOKE ALL ON animus.console_users FROM PUBLIC;

-- Live pages: every statement that inserts or updates work items notifies animus_changed,
-- without a payload (so once per transaction, however many statements): the console's one
-- listener then reads what changed, once for all its viewers.
CREATE FUNCTION animus.notify_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('animus_changed', '');
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION animus.notify_changed() FROM PUBLIC;

CREATE TRIGGER work_items_notify_changed AFTER INSERT OR UPDATE ON animus.work_items
    FOR EACH STATEMENT EXECUTE FUNCTION animus.notify_changed();
