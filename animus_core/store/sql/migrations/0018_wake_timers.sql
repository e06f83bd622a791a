-- Engines arm a timer for the next waiting item of each work type they run: at start-up,
-- after a reconnect, and each time a timer fires they ask for the earliest wake_at after
-- now, by work type. This index answers that without reading the waiting items.
CREATE INDEX work_items_wake_at ON animus.work_items (queue, work_type, wake_at)
    WHERE state = 'waiting' AND wake_at IS NOT NULL;
