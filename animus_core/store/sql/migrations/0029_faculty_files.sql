-- The text of a command faculty's files (its TOML file and hook scripts), stored once under
-- their digest as the execution records name them, so `animus work diff` can show what
-- changed in a script between two runs, not only that its digest did. Append-only, as the
-- records that name them.

CREATE TABLE animus.faculty_files (
    sha256     text PRIMARY KEY CHECK (sha256 LIKE 'sha256:%'),
    content    text NOT NULL,
    first_seen timestamptz NOT NULL DEFAULT now()
);

CREATE TRIGGER faculty_files_append_only BEFORE UPDATE OR DELETE ON animus.faculty_files
    FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();
CREATE TRIGGER faculty_files_no_truncate BEFORE TRUNCATE ON animus.faculty_files
    FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'animus_operator') THEN
        GRANT SELECT ON animus.faculty_files TO animus_reader;
        GRANT INSERT ON animus.faculty_files TO animus_operator;
    END IF;
END
$$;
