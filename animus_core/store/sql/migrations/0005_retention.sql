-- Indexes that `animus purge` needs to delete old finished work in batches.
--
-- Deleting a work item makes Postgres check every foreign key that points at it, one probe
-- per deleted row: without an index on the referencing column each probe scans the whole
-- table. parent_id already has one (work_items_parent); merged_into, replay_of and
-- schedule_ticks.work_id get theirs here. The partial index on resolved_at finds the purge
-- candidates without scanning live work.

CREATE INDEX work_items_merged_into ON animus.work_items (merged_into)
    WHERE merged_into IS NOT NULL;
CREATE INDEX work_items_replay_of ON animus.work_items (replay_of)
    WHERE replay_of IS NOT NULL;
CREATE INDEX work_items_finished_resolved ON animus.work_items (resolved_at)
    WHERE state IN ('completed', 'dead', 'merged', 'cancelled');
CREATE INDEX schedule_ticks_work ON animus.schedule_ticks (work_id)
    WHERE work_id IS NOT NULL;
