"""The value types and pure functions every layer shares: work items and their states, errors,
the JSON value model and limits, canonical hashing, execution records, schedules. No I/O."""
