-- Token usage and cost of the model calls a focus made, stored with the item's outcome:
-- {"models": {"<model>": {"input_tokens": .., "output_tokens": .., ...}}, "cost_usd": ..}
ALTER TABLE animus.work_items ADD COLUMN usage jsonb;
