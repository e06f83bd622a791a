-- A person of the console may also reach `animus mcp` over HTTP with a token (`animus web
-- user token NAME`). Only the token's SHA-256 is kept: a new token replaces the old one, and
-- NULL means none. Removing the person, as ever, removes their token with them.
ALTER TABLE animus.console_users ADD COLUMN mcp_token_sha256 bytea;
