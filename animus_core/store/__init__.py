"""Postgres: the one home of animus's SQL. The work store (:class:`Db`), migrations, audit chain,
roles, memory, retention and backup. Ungoverned: policy lives above it."""
