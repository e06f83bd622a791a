-- work_items keeps every item, and each takes two updates that cannot be HOT (its state is
-- indexed): autovacuum's default, a fifth of the table dead before a vacuum, let a table of
-- a million items carry 200,000 dead row versions (and their index entries) between
-- vacuums. A fiftieth of it, or 1,000, whichever is more.
ALTER TABLE animus.work_items SET (autovacuum_vacuum_scale_factor = 0.02,
                                   autovacuum_vacuum_threshold = 1000);
