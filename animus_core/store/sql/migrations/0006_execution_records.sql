-- Execution records: what each focus attempt was bound to, hashed, append-only.
-- Environments (Python, platform, installed distributions) are large and shared by every
-- attempt of an engine, so they are stored once under their hash.

CREATE TABLE animus.environments (
    hash        text PRIMARY KEY,
    environment jsonb NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE animus.execution_records (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    work_id          uuid NOT NULL,       -- no foreign key: records outlive purged items
    attempt          int NOT NULL,
    result           text NOT NULL CHECK (result IN ('completed', 'failed')),
    work_type        text NOT NULL,
    params_hash      text NOT NULL,
    faculty          jsonb NOT NULL,
    faculty_hash     text NOT NULL,
    engine_version   text NOT NULL,
    environment_hash text NOT NULL REFERENCES animus.environments (hash),
    models           jsonb NOT NULL DEFAULT '[]',
    outcome_hash     text,
    error            text,
    started_at       timestamptz NOT NULL,
    finished_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX execution_records_work ON animus.execution_records (work_id, attempt);

CREATE TRIGGER execution_records_append_only BEFORE UPDATE OR DELETE ON animus.execution_records
    FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();
CREATE TRIGGER execution_records_no_truncate BEFORE TRUNCATE ON animus.execution_records
    FOR EACH STATEMENT EXECUTE FUNCTION animus.refuse_change();
CREATE TRIGGER environments_append_only BEFORE UPDATE OR DELETE ON animus.environments
    FOR EACH ROW EXECUTE FUNCTION animus.refuse_change();
