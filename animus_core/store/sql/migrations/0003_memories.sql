-- Semantic memory: content, a generated full-text column, and an embedding whose dimension
-- follows the configured embedder. The embedding column gets its fixed dimension (and its
-- HNSW index) when an embedder is first configured (animus.memory_configure), because an
-- HNSW index needs one; animus memory reembed moves memories to another embedder.

CREATE TABLE animus.memory_config (
    singleton  bool PRIMARY KEY DEFAULT true CHECK (singleton),
    embedder   text NOT NULL,
    dimension  int NOT NULL CHECK (dimension BETWEEN 1 AND 2000),
    configured_at timestamptz NOT NULL DEFAULT now(),
    -- set while `animus memory reembed` moves memories to another embedder
    next_embedder  text,
    next_dimension int
);

CREATE TABLE animus.memories (
    id          uuid PRIMARY KEY DEFAULT animus.new_id(),
    content     text NOT NULL CHECK (btrim(content) <> ''),
    memory_type text NOT NULL DEFAULT 'semantic' CHECK (memory_type ~ '^[a-z][a-z0-9_]*$'),
    source      text,
    metadata    jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    embedding   vector,
    embedder    text,
    work_id     uuid,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    fts         tsvector GENERATED ALWAYS AS (to_tsvector('english', content)) STORED
);

CREATE INDEX memories_fts ON animus.memories USING gin (fts);
CREATE INDEX memories_metadata ON animus.memories USING gin (metadata jsonb_path_ops);
CREATE INDEX memories_type_created ON animus.memories (memory_type, created_at);
CREATE INDEX memories_source ON animus.memories (source);

-- Fix the embedding dimension and build the HNSW cosine index (idempotent for the same
-- embedder; refuses another one: that is a reembed).
CREATE FUNCTION animus.memory_configure(p_embedder text, p_dimension int) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    current animus.memory_config;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('animus.memory_configure'));
    SELECT * INTO current FROM animus.memory_config;
    IF FOUND THEN
        IF current.embedder = p_embedder AND current.dimension = p_dimension THEN
            RETURN;
        END IF;
        RAISE EXCEPTION 'memories are embedded with % (% dimensions), not % (% dimensions)',
            current.embedder, current.dimension, p_embedder, p_dimension
            USING ERRCODE = 'ANI05',
                  HINT = 'configure the same embedder, or move memories with: animus memory reembed';
    END IF;
    EXECUTE format('ALTER TABLE animus.memories ALTER COLUMN embedding TYPE vector(%s)', p_dimension);
    EXECUTE 'CREATE INDEX memories_embedding ON animus.memories
             USING hnsw (embedding vector_cosine_ops)';
    INSERT INTO animus.memory_config (embedder, dimension) VALUES (p_embedder, p_dimension);
END
$$;
