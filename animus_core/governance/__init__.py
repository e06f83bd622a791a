"""Policy above the store: rules and approval gates, and the governed way to submit work."""
