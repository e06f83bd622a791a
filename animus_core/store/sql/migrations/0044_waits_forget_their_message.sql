-- An item that waits without a timer gives up its queue message (0024), and now forgets it.
--
-- Its msg_id went on naming the message it gave up. A wake-up sends a new message, and an
-- item ended after its wake-up and before a claim (cancelled, dead-lettered, rejected)
-- archived the message it no longer had, leaving the new one in the queue: counted in the
-- queue's depth (and a fleet's scaling depth) until a claim read it and found the item
-- finished. Now a waiting item's msg_id is NULL while it has no message of its own; the claim
-- that takes it through the new message records that one, and an item ended before that
-- finds its message by its id (drop_message). Items waiting when this migration runs keep
-- the id they had, and end as before.

CREATE OR REPLACE FUNCTION animus.work_items_waiting_unqueued() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM animus.archive_messages(NEW.queue, ARRAY[NEW.msg_id]);
    NEW.msg_id := NULL;
    RETURN NEW;
END
$$;

DROP TRIGGER work_items_waiting_unqueued ON animus.work_items;
CREATE TRIGGER work_items_waiting_unqueued BEFORE UPDATE ON animus.work_items
    FOR EACH ROW WHEN (NEW.state = 'waiting' AND OLD.state <> 'waiting'
                       AND NEW.wake_at IS NULL AND NEW.msg_id IS NOT NULL)
    EXECUTE FUNCTION animus.work_items_waiting_unqueued();
