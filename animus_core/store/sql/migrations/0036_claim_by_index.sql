-- A claim takes the first visible messages in priority order, and the queue's index on
-- (priority DESC, msg_id) gives that order: walked, it stops after the few it takes. But the
-- planner cannot estimate how many messages `message->>'t' = ANY (...)` keeps (JSON, no
-- statistics: it guesses 0.5%), so with a backlog it chose to read and sort the whole queue
-- instead (14 ms at 12,000 messages, against 0.1 ms by the index), on every claim. Within
-- the claim functions, sorting is the last resort, and the index is used.
ALTER FUNCTION animus.claim(text, int, int, text[], bool) SET enable_sort = off;
ALTER FUNCTION animus.claim(text, int, int, text[], bool, jsonb) SET enable_sort = off;
