-- Cancelling work that is already claimed or running: the state machine has no
-- running -> cancelled, so the request is recorded here (and in the audit trail), engines
-- are told on the animus_cancel channel, and the engine holding the item stops its focus and
-- ends it failed -> dead with a reason that says who cancelled it.
ALTER TABLE animus.work_items ADD COLUMN cancel_requested text;
