-- One row per fired schedule tick. The primary key makes a tick fire once however many
-- engines race for it; the row is written in the transaction that submits the work.
CREATE TABLE animus.schedule_ticks (
    name     text NOT NULL,
    tick     timestamptz NOT NULL,
    work_id  uuid REFERENCES animus.work_items (id),
    fired_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, tick)
);
