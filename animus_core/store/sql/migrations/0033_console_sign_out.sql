-- Signing out of the console ends every session of the person, on every device: a session
-- signed in before signed_out_at is no longer valid, however long its cookie would last. A
-- new password or role does the same (`animus web user add` sets it).
ALTER TABLE animus.console_users ADD COLUMN signed_out_at timestamptz;
