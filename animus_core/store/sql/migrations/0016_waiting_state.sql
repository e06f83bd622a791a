-- The state `waiting`: a suspended focus (a sleep, a wait for a signal) ended its attempt
-- and holds no slot and no lease until it is woken (0017_waiting.sql has the rest).
--
-- A value added to an enum cannot be used in the transaction that adds it: this migration
-- is committed before the next one runs (the marker below tells animus to).
-- animus: commit after

ALTER TYPE animus.work_state ADD VALUE IF NOT EXISTS 'waiting' AFTER 'running';
