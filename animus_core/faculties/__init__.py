"""The faculty contract (pluggy hook specs and markers), the plugin manager, the Faculty and
Focus classes, and the built-in plugins: TOML command faculties, pipelines, embedders, the
Claude engage loop."""
