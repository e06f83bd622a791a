-- Seals made with a key the database does not hold (ANIMUS_AUDIT_KEY): key_id names the key
-- that sealed a row (a fingerprint, never the key); NULL is the keyless sha256 of earlier
-- seals, which keep verifying as they are. Adding a nullable column rewrites nothing, and
-- the append-only triggers guard row changes, not the table's shape.
ALTER TABLE animus.audit_seal ADD COLUMN key_id text;
COMMENT ON COLUMN animus.audit_seal.key_id IS
    'NULL: hash = sha256(prev_hash || row); else hash = HMAC-SHA256(key, prev_hash || row) '
    'with the audit key whose fingerprint this is (animus_core.witness.key_id)';
