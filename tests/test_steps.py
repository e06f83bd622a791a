"""Durable steps (docs/concepts.md, Durable steps): ``focus.step`` runs its body once per work
item, records the result before it returns, and every later attempt replays it; a changed
order is a named error that dead-letters the item. Real engine, real Postgres."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from animus_core import Db, Faculty, Focus, LeaseLost, NewWorkItem, State, StepPolicy
from animus_core.store.retention import purge
from animus_core.testing import run_faculties
from animus_core.values.canonical import canonical_hash
from animus_core.values.errors import IllegalTransition, InvalidInput, WorkNotFound
from tests.support import raw


class Tally:
    """Counts each step body's runs in a file per name (what a side effect would be)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def hit(self, name: str) -> int:
        path = self.root / f"{name}.count"
        n = int(path.read_text()) + 1 if path.exists() else 1
        path.write_text(str(n))
        return n

    def runs(self, name: str) -> int:
        path = self.root / f"{name}.count"
        return int(path.read_text()) if path.exists() else 0


class Steps(Faculty):
    """Runs the steps named in params["steps"]; fails after step params["fail_after"] on the
    first attempt; calls params["order"] instead on attempts after the first."""

    name = "steps"
    accepts = ("steps",)
    retry_base = 0.0
    retry_max = 0.0

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        names = focus.params["steps"]
        if focus.attempt > 1 and "order" in focus.params:
            names = focus.params["order"]
        results = []
        for i, name in enumerate(names, 1):
            if i % 2:  # sync and async bodies alike
                results.append(await focus.step(name, self.tally.hit, name))
            else:
                results.append(await focus.step(name, self._hit_async, name))
            if focus.attempt == 1 and focus.params.get("fail_after") == i:
                raise RuntimeError(f"failing after step {i}")
        once = self.tally.root / "failed-once"
        if focus.params.get("fail_once") and not once.exists():
            once.write_text("")
            raise RuntimeError("failing once")
        return {"results": results, "attempt": focus.attempt}

    async def _hit_async(self, name: str) -> int:
        await asyncio.sleep(0)
        return self.tally.hit(name)


def steps_item(names: list[str], **params: Any) -> NewWorkItem:
    return NewWorkItem("steps", source="test").params({"steps": names, **params})


async def test_steps_run_once_and_a_retry_after_a_failure_replays_them(db_url, tmp_path):
    tally = Tally(tmp_path)
    async with run_faculties([Steps(tally)], home=tmp_path, database_url=db_url) as animus:
        item = await animus.run(steps_item(["fetch", "think", "write"], fail_after=2))
        steps = await animus.db.steps(item.id)
        records = await animus.db.executions(item.id)
        history = await animus.db.history(item.id)
    assert item.state == State.COMPLETED
    assert item.outcome.data == {"results": [1, 1, 1], "attempt": 2}
    assert [tally.runs(n) for n in ("fetch", "think", "write")] == [1, 1, 1]
    assert [(s.position, s.name, s.attempt, s.result) for s in steps] == [
        (1, "fetch", 1, 1), (2, "think", 1, 1), (3, "write", 2, 1)]
    assert all(s.result_hash == canonical_hash(1, nfc=True) for s in steps)
    assert [(r.attempt, r.result, r.steps) for r in records] == [
        (1, "failed", {"ran": [{"position": 1, "name": "fetch"},
                               {"position": 2, "name": "think"}], "replayed": []}),
        (2, "completed", {"ran": [{"position": 3, "name": "write"}],
                          "replayed": [{"position": 1, "name": "fetch"},
                                       {"position": 2, "name": "think"}]})]
    audited = [e.payload for e in history if e.event == "step"]
    assert [(p["position"], p["name"], p["attempt"]) for p in audited] == [
        (1, "fetch", 1), (2, "think", 1), (3, "write", 2)]


async def test_a_focus_reads_no_steps_of_its_own_the_claim_brings_them(db_url, tmp_path,
                                                                       monkeypatch):
    class Plain(Faculty):
        name = "plain"
        accepts = ("plain",)

    reads: list[Any] = []
    real = Db.steps

    async def counted(self: Db, work_id: Any) -> Any:  # the real query, counted
        reads.append(work_id)
        return await real(self, work_id)

    monkeypatch.setattr(Db, "steps", counted)
    tally = Tally(tmp_path)
    async with run_faculties([Plain(), Steps(tally)], home=tmp_path,
                             database_url=db_url) as animus:
        plain = await animus.run(NewWorkItem("plain", source="test"))
        assert reads == []
        stepped = await animus.run(steps_item(["a", "b", "c"]))
        assert reads == []  # a first attempt has no record to read
        retried = await animus.run(steps_item(["a", "b", "c"], fail_after=2))
        [record] = await animus.db.executions(plain.id)
    assert plain.state == stepped.state == retried.state == State.COMPLETED
    assert record.steps is None
    assert reads == []  # the retry's record came with its claim: no query of its own


async def test_a_changed_step_order_is_named_and_dead_letters(db_url, tmp_path):
    tally = Tally(tmp_path)
    async with run_faculties([Steps(tally)], home=tmp_path, database_url=db_url) as animus:
        item = await animus.run(steps_item(["fetch", "fetch2", "write"], fail_after=2,
                                           order=["fetch", "summarise", "write"]))
    assert item.state == State.DEAD
    assert item.attempts == 2  # not retried again: retrying cannot help
    assert "StepOrderChanged: step 2 is 'fetch2' in the record" in (item.reason or "")
    assert "this attempt called 'summarise'" in (item.reason or "")
    assert (tally.runs("summarise"), tally.runs("write")) == (0, 0)


class Odd(Faculty):
    name = "odd"
    accepts = ("odd",)
    max_attempts = 1

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        kind = focus.params["kind"]
        if kind == "big":
            return await focus.step("load", lambda: "x" * 5000)
        if kind == "nan":
            return await focus.step("measure", lambda: {"values": [1.0, float("nan")]})
        return await focus.step("opaque", lambda: object())


async def test_a_result_outside_the_json_model_or_over_the_limit_is_refused(db_url, tmp_path,
                                                                             monkeypatch):
    from animus_core.values.limits import limits
    monkeypatch.setenv("ANIMUS_MAX_OUTCOME_BYTES", "1024")
    limits.cache_clear()
    try:
        async with run_faculties([Odd()], home=tmp_path, database_url=db_url) as animus:
            big = await animus.run(NewWorkItem("odd", source="t").params({"kind": "big"}))
            nan = await animus.run(NewWorkItem("odd", source="t").params({"kind": "nan"}))
            opaque = await animus.run(NewWorkItem("odd", source="t").params({"kind": "x"}))
            assert [await animus.db.steps(i.id) for i in (big, nan, opaque)] == [[], [], []]
    finally:
        monkeypatch.delenv("ANIMUS_MAX_OUTCOME_BYTES")
        limits.cache_clear()
    assert big.state == nan.state == opaque.state == State.DEAD
    assert "step 1 'load' result is " in (big.reason or "")
    assert "ANIMUS_MAX_OUTCOME_BYTES" in (big.reason or "")
    assert "step 1 'measure' result.values[1]" in (nan.reason or "")
    assert "step 1 'opaque' result" in (opaque.reason or "")


class Flaky(Faculty):
    name = "flaky"
    accepts = ("flaky",)
    max_attempts = 1

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        def call(name: str, succeed_on: int) -> str:
            n = self.tally.hit(name)
            if n < succeed_on:
                raise ConnectionError(f"try {n} failed")
            return f"ok on try {n}"
        policy = StepPolicy(attempts=3, backoff=0.01)
        first = await focus.step("call", call, "call", 3, policy=policy)
        return [first, await focus.step("never", call, "never", 9, policy=policy)]


async def test_a_step_policy_retries_the_body_within_the_attempt(db_url, tmp_path):
    tally = Tally(tmp_path)
    async with run_faculties([Flaky(tally)], home=tmp_path, database_url=db_url) as animus:
        item = await animus.run(NewWorkItem("flaky", source="t"))
        steps = await animus.db.steps(item.id)
    assert (tally.runs("call"), tally.runs("never")) == (3, 3)
    assert [(s.name, s.result) for s in steps] == [("call", "ok on try 3")]
    assert item.state == State.DEAD
    assert "ConnectionError: try 3 failed" in (item.reason or "")
    with pytest.raises(Exception, match="attempts must be from 1 to 100"):
        StepPolicy(attempts=0)


async def _running(db: Any, work_type: str = "held") -> Any:
    await db.submit_work(NewWorkItem(work_type, source="t"))
    [claimed] = await db.claim(lease_seconds=300, start=True, work_types=[work_type])
    return claimed


def _raw(value: Any) -> msgspec.Raw:
    return msgspec.Raw(json.dumps(value).encode())


async def test_a_lost_lease_cannot_record_a_step(db, db_url):
    claimed = await _running(db)
    now = datetime.now(UTC)
    await db.record_step(claimed.lease, 1, "first", _raw({"a": 1}), result_hash="h",
                         started_at=now, duration_ms=3)
    stale = msgspec.structs.replace(claimed.lease, token=claimed.lease.token + 1)
    with pytest.raises(LeaseLost, match="lease lost"):
        await db.record_step(stale, 2, "second", _raw(2), result_hash="h", started_at=now,
                             duration_ms=1)
    with pytest.raises(IllegalTransition, match="recorded already"):
        await db.record_step(claimed.lease, 1, "again", _raw(2), result_hash="h",
                             started_at=now, duration_ms=1)
    assert [(s.position, s.name, s.result, s.attempt) for s in await db.steps(claimed.item.id)] \
        == [(1, "first", {"a": 1}, 1)]
    async with raw(db_url) as conn:
        with pytest.raises(Exception, match="refused"):
            await conn.execute("UPDATE animus.steps SET name = 'forged'")


async def test_rerun_from_a_step_copies_the_steps_before_it(db, db_url, tmp_path):
    tally = Tally(tmp_path)
    async with run_faculties([Steps(tally)], home=tmp_path, database_url=db_url) as animus:
        first = await animus.run(steps_item(["fetch", "think", "write"]))
        governed = animus.animus.governed
        again = await governed.submit_from_step(
            (await db.get_work_item(first.id)).again(source="t", trigger="rerun"),
            first.id, "think")
        done = await animus.animus.wait_finished(again.id, 30)
        steps = await db.steps(done.id)
        with pytest.raises(WorkNotFound, match=r"no recorded step named 'nope': its steps are "
                                                r"'fetch', 'think', 'write'"):
            await governed.submit_from_step(first.again(source="t", trigger="x"), first.id,
                                            "nope")
        history = await db.history(done.id)
    assert done.state == State.COMPLETED
    assert done.outcome.data == {"results": [1, 2, 2], "attempt": 1}
    assert [(s.name, s.copied_from) for s in steps] == [
        ("fetch", first.id), ("think", None), ("write", None)]
    assert [tally.runs(n) for n in ("fetch", "think", "write")] == [1, 2, 2]
    [copied] = [e.payload for e in history if e.event == "steps_copied"]
    assert copied == {"from": str(first.id), "before": "think", "steps": 1}


async def test_steps_are_copied_only_into_a_fresh_rerun_by_its_submitter(db):
    claimed = await _running(db)
    await db.record_step(claimed.lease, 1, "a", _raw(1), result_hash="h",
                         started_at=datetime.now(UTC), duration_ms=1)
    other = await db.submit_work(NewWorkItem("held", source="t"))
    async with db.connection() as conn:
        with pytest.raises(Exception, match="not a rerun or replay"):
            await conn.fetchval("SELECT animus.copy_steps($1, $2, 'a')", other.id,
                                claimed.item.id)
    await db.complete(claimed.lease, None)
    done = await db.get_work_item(claimed.item.id)
    earlier = await db.submit_work(done.again(source="t", trigger="rerun"))
    async with db.connection() as conn:
        with pytest.raises(Exception, match="not submitted in this transaction"):
            await conn.fetchval("SELECT animus.copy_steps($1, $2, 'a')", earlier.id,
                                claimed.item.id)
    assert await db.steps(earlier.id) == []


async def test_purge_removes_steps_with_their_item(db):
    claimed = await _running(db)
    await db.record_step(claimed.lease, 1, "a", _raw(1), result_hash="h",
                         started_at=datetime.now(UTC), duration_ms=1)
    await db.complete(claimed.lease, None)
    report = await purge(db, older_than=timedelta(0))
    assert report.items == {"completed": 1}
    assert await db.steps(claimed.item.id) == []


async def test_the_cli_shows_steps_and_replays_a_dead_item_from_a_step(db_url, tmp_path,
                                                                       animus):
    tally = Tally(tmp_path)
    async with run_faculties([Steps(tally)], home=tmp_path, database_url=db_url) as running:
        dead = await running.run(steps_item(["fetch", "think", "write"], fail_once=True)
                                 .max_attempts(1))
        assert dead.state == State.DEAD
        shown = animus("work", "show", str(dead.id))
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.split("steps:\n", 1)[1].splitlines()
        assert [line.split()[:4] for line in lines] == [
            ["1", "fetch", "attempt", "1"], ["2", "think", "attempt", "1"],
            ["3", "write", "attempt", "1"]]
        assert all(line.split()[-1].startswith("sha256:") for line in lines)

        refused = animus("work", "retry", str(dead.id), "--from-step", "nope")
        assert refused.returncode == 2
        assert "no recorded step named 'nope'" in refused.stderr
        out = animus("work", "retry", str(dead.id), "--from-step", "think")
        assert out.returncode == 0, out.stderr
        new_id = out.stdout.split()[3]
        assert out.stdout.strip().endswith("from step think")
        again = await running.animus.wait_finished(new_id, 30)
        assert again.state == State.COMPLETED
        assert again.outcome.data == {"results": [1, 2, 2], "attempt": 1}
        explained = animus("work", "explain", new_id)
        assert explained.returncode == 0, explained.stderr
        assert f"copied from {dead.id}" in explained.stdout
        assert "stepsreplayed1:fetch" in explained.stdout.replace(" ", "")
        assert "stepsran2:think,3:write" in explained.stdout.replace(" ", "")

        # (the CLI runs in this event loop's thread: it may not wait for the engine here)
        rerun = animus("work", "rerun", new_id, "--from-step", "write", "--no-wait")
        assert rerun.returncode == 0, rerun.stderr
        rerun_id = rerun.stdout.split()[1]
        assert (await running.animus.wait_finished(rerun_id, 30)).state == State.COMPLETED
        diff = animus("work", "diff", new_id, rerun_id, "--json")
        assert diff.returncode == 0, diff.stderr
        # the replayed steps gave the same results; write ran again and counted 3
        assert json.loads(diff.stdout)["verdict"] == (
            "nondeterministic: same inputs, different output (outcome.results)")
        assert json.loads(diff.stdout)["differences"]["outcome.results"] == {
            "a": [1, 2, 2], "b": [1, 2, 3]}
        assert (await running.db.get_work_item(rerun_id)).outcome.data == {
            "results": [1, 2, 3], "attempt": 1}
    assert [tally.runs(n) for n in ("fetch", "think", "write")] == [1, 2, 3]


class Gathered(Faculty):
    """Starts three steps together; the last finishes first. Fails its first attempt."""

    name = "gathered"
    accepts = ("gathered",)
    retry_base = 0.0
    retry_max = 0.0

    def __init__(self, tally: Tally) -> None:
        self.tally = tally

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        async def slow(name: str, delay: float) -> str:
            await asyncio.sleep(delay)
            return f"{name} after run {self.tally.hit(name)}"
        results = await asyncio.gather(*(focus.step(n, slow, n, d) for n, d in
                                         (("x", 0.2), ("y", 0.1), ("z", 0.0))))
        if focus.attempt == 1:
            raise RuntimeError("once more")
        return results


async def test_steps_started_together_take_positions_in_call_order(db_url, tmp_path):
    tally = Tally(tmp_path)
    async with run_faculties([Gathered(tally)], home=tmp_path, database_url=db_url) as animus:
        item = await animus.run(NewWorkItem("gathered", source="t"))
        steps = await animus.db.steps(item.id)
    assert item.outcome.data == ["x after run 1", "y after run 1", "z after run 1"]
    assert [(s.position, s.name, s.attempt) for s in steps] == [
        (1, "x", 1), (2, "y", 1), (3, "z", 1)]
    assert steps[2].finished_at < steps[1].finished_at < steps[0].finished_at


def test_a_step_policy_doubles_its_backoff_up_to_its_ceiling():
    policy = StepPolicy(attempts=5, backoff=0.5, max_backoff=1.5)
    assert [policy.delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    with pytest.raises(InvalidInput, match="backoff"):
        StepPolicy(backoff=float("nan"))


class Leaky(Faculty):
    """Returns a declared secret's value from a step."""

    name = "leaky-step"
    accepts = ("leaky-step",)
    secrets = ("STEP_PASSPHRASE",)

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        import os

        return {"seen": await focus.step("read", lambda: os.environ["STEP_PASSPHRASE"])}


async def test_a_step_result_is_redacted_before_it_is_stored(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("STEP_PASSPHRASE", "correct-horse-battery-staple")
    async with run_faculties([Leaky()], home=tmp_path, database_url=db_url) as animus:
        item = await animus.run(NewWorkItem("leaky-step"))
        steps = await animus.db.steps(item.id)
    assert item.state == State.COMPLETED, item.reason
    assert [s.result for s in steps] == ["[redacted STEP_PASSPHRASE]"]
    assert item.outcome.data == {"seen": "[redacted STEP_PASSPHRASE]"}
