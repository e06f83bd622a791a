"""animus's version, recorded in execution records, telemetry and backups."""

__version__ = "0.1.0"
