"""The process's surroundings: settings, secret redaction, logging and telemetry, the audit
witness (keys and checkpoints kept outside the database), the embedded Postgres server and the
guard that kills hook processes with their engine."""
