"""The engine: wakes on NOTIFY, claims up to free capacity, runs foci, records what they did."""
