"""The benchmarks' own instruments (the benchmarks themselves run from benchmarks/README.md)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from animus_core.store.audit import UNSEALED_SQL
from benchmarks import (
    bench_agents,
    bench_console,
    bench_cycle,
    bench_engine,
    bench_fleet,
    bench_mcp,
    bench_mvcc,
    bench_overload,
    bench_rate,
    bench_waits,
)
from benchmarks.bench_engine import CpuMeter, CpuUse
from benchmarks.chaos import ItemRow, Run, classify, digest_log, overlaps, parse_markers, window_rate
from tests.support import raw


async def test_the_cpu_meter_finds_the_server_and_sees_its_work(db_url):
    meter = await CpuMeter.for_server(db_url)
    assert meter.postmaster is not None  # the embedded server runs on this machine
    async with raw(db_url) as conn:
        before = meter.read()
        await conn.execute("SELECT count(*) FROM generate_series(1, 3000000)")
        after = meter.read()
    use = CpuUse.between(1000, before, after)
    assert use.server is not None
    assert use.server > 0.05  # a few hundred milliseconds of one backend's CPU
    assert use.own >= 0


async def test_the_drain_also_counts_the_cpu_of_sealing_its_audit_rows(server_url, tmp_path):
    """bench_engine's drain: besides the CPU until the last completion (which leaves audit
    rows to the sealer), the CPU until every audit row of the drain is sealed, and they are."""
    url = await bench_engine.fresh_animus_db(bench_engine.Server(server_url),
                                             "animus_bench_drain_smoke")
    meter = await CpuMeter.for_server(url)
    line, stats = await bench_engine.drain_animus(url, tmp_path, 500, meter)
    assert line.cpu is not None
    own, server = line.cpu.per_item()
    sealed = stats["cpu_us_per_item_every_row_sealed"]
    # the stats are rounded to hundredths of a microsecond: compare like with like
    assert sealed["process"] >= round(own, 2) > 0, (line, stats)
    assert server is not None
    assert sealed["server"] >= round(server, 2) > 0, (line, stats)
    async with raw(url) as conn:
        assert await conn.fetchval(UNSEALED_SQL) == 0


async def test_the_drains_for_context_leave_out_the_audit_rows_then_the_records(
        server_url, tmp_path):
    """bench_engine's context drains write no audit rows for the drain's moves, then no
    execution records either; the drain as animus runs writes both."""
    server = bench_engine.Server(server_url)
    written = {}
    for without in ((), ("audit",), ("audit", "records")):
        url = await bench_engine.fresh_animus_db(server, "animus_bench_context_smoke")
        line, stats = await bench_engine.drain_animus(url, tmp_path, 200, without=without)
        assert stats["states"] == {"completed": 200}
        async with raw(url) as conn:
            written[without] = (
                await conn.fetchval("SELECT count(*) FROM animus.audit_log"),
                await conn.fetchval("SELECT count(*) FROM animus.execution_records"))
        assert ("context" in line.label) == bool(without), line.label
    assert written[()] == (200 * 4, 200)  # submitted, claimed, running, completed; a record each
    assert written[("audit",)] == (200, 200)  # the submissions' rows only
    assert written[("audit", "records")] == (200, 0)
    with pytest.raises(ValueError, match="unknown"):
        await bench_engine.drain_animus(url, tmp_path, 1, without=("everything",))


def test_cpu_per_item_in_microseconds():
    use = CpuUse.between(1000, (2.0, 10.0), (2.5, 10.25))
    assert use.per_item() == (500.0, 250.0)


def test_cpu_per_item_without_the_server():
    use = CpuUse.between(4, (1.0, None), (1.002, None))
    assert use.server is None
    own, server = use.per_item()
    assert round(own) == 500
    assert server is None


async def test_the_waiting_benchmark_runs_in_its_quick_mode(server_url, monkeypatch, tmp_path):
    """bench_waits --quick end to end on the test server: an engine process suspends items,
    a signal_many resumes them all, signals and sleeps resume foci; every figure is there
    and every item completed (the figures themselves are too small to judge by)."""
    monkeypatch.setenv("DATABASE_URL", server_url)
    cfg = bench_waits.Config.small()
    report = await bench_waits.run(cfg, "animus_bench_waits_smoke")
    assert report["check"]["ok"], report["check"]
    assert report["check"]["states"] == {"completed": cfg.n + cfg.k + bench_waits.WARMUP
                                         + cfg.sleeps}
    free, resume, sleep = (report["sections"][k] for k in ("free", "resume", "sleep"))
    assert [c["label"] for c in free["checks"]] == [
        f"fresh engine's RSS with {cfg.n} waiting / RSS idle",
        "engine queries per second while nothing wakes",
        f"signal_many -> all {cfg.n} completed, seconds"]
    assert all(c["value"] is not None and c["met"] is not None for c in free["checks"])
    assert len(resume["details"]["resume_ms"]) == cfg.k
    assert all(x > 0 for x in resume["details"]["resume_ms"])
    assert len(sleep["details"]["late_ms"]) == cfg.sleeps
    assert len(report["machine"]["load_average_start"]) == 3
    text = bench_waits.render(report)
    assert "QUICK smoke run" in text
    assert "load avg" in text
    json.dumps(report)  # the --json output


async def test_the_console_benchmark_runs_in_its_quick_mode(server_url, monkeypatch):
    """bench_console --quick end to end: a real `animus web` over a few thousand items, a
    signed-in client fetching every page, viewers on the live feed (figures too small to
    judge by, but every one of them there)."""
    monkeypatch.setenv("DATABASE_URL", server_url)
    cfg = bench_console.Config.small()
    report = await bench_console.run(cfg, "animus_bench_console_smoke")
    render, viewers = report["sections"]["render"], report["sections"]["viewers"]
    assert all(c["value"] is not None and c["value"] > 0 for c in render["checks"])
    by_label = {c["label"]: c for c in viewers["checks"]}
    assert by_label["LISTEN connections with viewers"]["value"] == 1
    assert by_label["transactions/s with viewers / without"]["value"] is not None
    events = [r for r in viewers["results"] if r["label"].startswith("change events")]
    assert events[0]["value"] > 0  # the viewers saw the writer's changes
    assert "load avg" in bench_console.render(report)
    json.dumps(report)


async def test_the_mcp_benchmark_runs_with_a_few_calls():
    """bench_mcp with a few pairs: two real stdio servers, every figure there."""
    report = await bench_mcp.run(5)
    section = report["sections"]["calls"]
    assert all(r["value"] is not None for r in section["results"])
    assert section["checks"][0]["label"] == "added latency p50, ms"
    assert "load avg" in bench_mcp.render(report)
    json.dumps(report)


async def test_the_fleet_benchmark_runs_small(server_url, monkeypatch):
    """bench_fleet with one and two small engines: real engine processes, every figure."""
    monkeypatch.setenv("DATABASE_URL", server_url)
    args = bench_fleet.parse_args(["--engines", "1,2", "--concurrency", "4", "--seconds", "1",
                                   "--work", "0.05", "--database", "animus_bench_fleet_smoke"])
    report = await bench_fleet.run(args)
    section = report["sections"]["fleet"]
    assert all(r["value"] is not None and r["value"] > 0 for r in section["results"]
               if "CPU" not in r["label"])
    twice = [c for c in section["checks"] if "twice" in c["label"]]
    assert [c["value"] for c in twice] == [0, 0]
    assert "the curve bends at" in bench_fleet.render(report)
    json.dumps(report)


async def test_the_agent_scale_benchmark_runs_small(server_url, monkeypatch):
    """bench_agents with a small engine: a real engine process, every figure (the loop's lag
    watched from inside it, lease extensions counted by Postgres)."""
    monkeypatch.setenv("DATABASE_URL", server_url)
    # a window (10% to 90% of the backlog) of about 3 s: several extensions, each counted
    # once its backend reports its statistics (within a second)
    args = bench_agents.parse_args(["--foci", "40", "--work", "0.6", "--seconds", "4",
                                    "--lease", "2", "--database", "animus_bench_agents_smoke"])
    report = await bench_agents.run(args)
    section = report["sections"]["agents"]
    values = {r["label"]: r["value"] for r in section["results"]}
    assert [k for k, v in values.items() if v is None or v < 0] == []
    assert values["throughput"] > 0
    # with a 2 s lease the keeper extends every second: leases are extended
    assert values["lease keeping: extend_leases calls per second"] > 0
    checks = {c["label"]: c for c in section["checks"]}
    assert checks["items run twice"]["value"] == 0
    assert checks["attempts taken back (leases lapsed)"]["value"] == 0
    assert "agent-scale" in bench_agents.render(report)
    json.dumps(report)


async def test_the_short_work_benchmark_runs_small(server_url, monkeypatch):
    """bench_cycle with two small cases: an engine and raw pgmq workers, every figure."""
    monkeypatch.setenv("DATABASE_URL", server_url)
    args = bench_cycle.parse_args(["--concurrency", "1,2", "--work", "5", "--seconds", "0.2",
                                   "--database", "animus_bench_cycle_smoke"])
    report = await bench_cycle.run(args)
    section = report["sections"]["cycle"]
    assert [r["label"] for r in section["results"] if r["value"] is None] == []
    rates = [r["value"] for r in section["results"] if r["unit"] == "items/s"]
    assert len(rates) == 2 * 4
    assert min(rates) > 0
    assert "short-work" in bench_cycle.render(report)
    json.dumps(report)


async def test_the_short_work_benchmarks_wait_ends_in_deadline_order_and_never_early():
    """bench_cycle's work: waits started together end in the order of their deadlines, each
    no sooner than asked."""
    clock = bench_cycle.Clock()
    ended: list[float] = []

    async def wait(seconds: float) -> None:
        began = time.monotonic()
        await clock.sleep(seconds)
        assert time.monotonic() - began >= seconds
        ended.append(seconds)

    try:
        await asyncio.gather(wait(0.006), wait(0.002), wait(0.004), wait(0.002))
    finally:
        clock.close()
    assert ended == [0.002, 0.002, 0.004, 0.006]
    assert clock.waits == 4
    mean = clock.mean_ms()
    assert mean is not None
    assert mean >= 3.5  # (6 + 2 + 4 + 2) / 4 ms at least


@pytest.mark.parametrize("argv", [["--concurrency", "0"], ["--work", "0"],
                                  ["--work", "x"], ["--seconds", "0"]])
def test_the_short_work_benchmark_refuses_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        bench_cycle.parse_args(argv)
    assert "must be" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--foci", "0"], ["--work", "0"], ["--lease", "0"]])
def test_the_agent_scale_benchmark_refuses_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        bench_agents.parse_args(argv)
    assert "must be" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--n", "0"], ["--window", "0"], ["--database", "Bad-Name"]])
def test_the_waiting_benchmark_refuses_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        bench_waits.parse_args(argv)
    assert "must be" in capsys.readouterr().err


# -- the chaos suite's bookkeeping (benchmarks/chaos.py) ------------------------------------------


def test_markers_pair_each_start_with_its_end_and_skip_torn_lines():
    runs = parse_markers([
        "S w1 1 100 10.0", "S w2 1 101 10.5", "E w1 1 100 10.2",
        "E w2 1 10",  # torn: a hook killed mid-write
        "S w1 2 102 13.0", "garbage", "E w1 2 102 13.1",
    ])
    assert runs["w1"] == [Run("w1", 1, 100, 10.0, 10.2), Run("w1", 2, 102, 13.0, 13.1)]
    assert runs["w2"] == [Run("w2", 1, 101, 10.5, None)]


def test_runs_one_after_the_other_do_not_overlap():
    assert overlaps([Run("w", 1, 1, 0.0, 1.0), Run("w", 2, 2, 1.0, 2.0)]) == []


def test_a_run_starting_inside_another_overlaps_it():
    a, b, c = Run("w", 1, 1, 0.0, 5.0), Run("w", 2, 2, 3.0, 4.0), Run("w", 3, 3, 4.5, 6.0)
    assert overlaps([c, b, a]) == [(a, b), (a, c)]


def test_a_killed_run_counts_only_where_it_certainly_overlapped():
    killed = Run("w", 1, 1, 0.0, None)  # no end marker: when it died is unknown
    after = Run("w", 2, 2, 3.0, 4.0)
    assert overlaps([killed, after]) == []
    inside = Run("w", 1, 3, 3.5, None)  # but it started while another run was going on
    assert overlaps([after, inside]) == [(after, inside)]


def test_classify_counts_lost_stuck_dead_and_twice_per_acknowledged_key():
    acked = {"k1": "a", "k2": "b", "k3": "c", "k4": "d", "k5": "e", "k6": "f"}
    items = [
        ItemRow("a", "k1", "completed"),
        ItemRow("b", "k2", "completed"),
        ItemRow("c", "k3", "queued"),  # stuck
        ItemRow("d", "k4", "dead"),
        ItemRow("e", "k5", "completed"), ItemRow("e2", "k5", "completed"),  # resubmitted
        ItemRow("m", "k1", "merged", merged_into="a"),  # a retry that found k1 live
        # k6: acknowledged, never stored
    ]
    completions = {"a": 1, "b": 2, "e": 1, "e2": 1}
    t = classify(acked, items, completions)
    assert (t.submitted, t.completed, t.lost, t.completed_twice, t.stuck, t.dead,
            t.duplicate_items) == (6, 3, 2, 2, 1, 1, 1)
    assert t.examples["lost"] == ["k6"]
    assert t.examples["stuck"] == ["k3"]
    assert sorted(t.examples["completed_twice"]) == ["k2", "k5"]
    assert not t.met


def test_classify_meets_the_target_when_everything_completed_once():
    t = classify({"k": "a"}, [ItemRow("a", "k", "completed")], {"a": 1})
    assert t.met
    assert (t.completed, t.lost, t.completed_twice, t.stuck) == (1, 0, 0, 0)


def test_window_rate_counts_events_in_a_half_open_window():
    assert window_rate([0.5, 1.0, 1.5, 2.0, 3.0], 1.0, 3.0) == 1.5


def test_digest_log_counts_kinds_of_warnings_not_their_ids():
    log = "\n".join([
        "05:05:20 WARNING animus.engine: could not complete 01a23524-6d72-7e33-89a5-2337be8ea348:"
        " lease lost",
        "05:05:21 WARNING animus.engine: could not complete 01a23524-6d81-731a-95f9-44495134c50d:"
        " lease lost",
        "05:05:21 INFO    animus.engine: listener reconnected",
        "05:05:21 WARNING animus.engine: lease lost on work item 01a23524-6d81-731a-95f9-44495134"
        "c50d (attempt 1): its lease could not be extended and ends in 0.4s; stopping its focus",
        "05:05:22 ERROR   animus.engine: claim failed, retrying in 0.5s",
    ])
    d = digest_log(log)
    assert d["levels"] == {"WARNING": 3, "ERROR": 1}
    assert d["completions_refused"] == 2
    assert d["foci_fenced"] == 1
    assert d["top"][0] == "2 x WARNING could not complete <id>: lease lost"


async def test_the_rate_benchmark_runs_in_its_quick_mode(server_url, monkeypatch):
    """bench_rate --quick end to end: a backlog paced by a faculty's rate_limit completes,
    and the achieved rate is measured (not judged here: it is a timing)."""
    monkeypatch.setenv("DATABASE_URL", server_url)
    report = await bench_rate.run(bench_rate.QUICK, "animus_bench_rate_smoke")
    [result] = report["results"]
    assert (result["configured"], result["items"]) == bench_rate.QUICK[0]
    assert result["achieved"] > 0
    assert result["ratio"] == round(result["achieved"] / result["configured"], 4)
    assert "within 5%" in bench_rate.render(report)


async def test_the_mvcc_benchmark_runs_small(server_url, monkeypatch):
    """bench_mvcc with a few seconds at a low rate: an engine and raw pgmq workers under a
    held xmin horizon, every figure and every table's dead tuples."""
    monkeypatch.setenv("DATABASE_URL", server_url)
    args = bench_mvcc.parse_args(["--rate", "50", "--warmup", "0.5", "--hold", "1",
                                  "--recovery", "1", "--concurrency", "4",
                                  "--database", "animus_bench_mvcc_smoke"])
    report = await bench_mvcc.run(args)
    mvcc, dead = report["sections"]["mvcc"], report["sections"]["dead_tuples"]
    assert [r["label"] for r in mvcc["results"] + dead["results"] if r["value"] is None] == []
    assert [c["label"] for c in mvcc["checks"] if c["value"] is None] == []
    checks = {c["label"]: c for c in mvcc["checks"]}
    assert checks["items run twice"]["value"] == 0
    assert checks["raw pgmq: messages read twice"]["value"] == 0
    assert mvcc["details"]["windows"]["hold"]["items"] > 0
    assert any(r["label"].startswith("dead tuples: animus.work_items") for r in dead["results"])
    assert len(dead["details"]["animus"]) >= 3  # one sample a second, and each phase's end
    assert "MVCC-pressure" in bench_mvcc.render(report)
    json.dumps(report)


@pytest.mark.parametrize("argv", [["--rate", "0"], ["--warmup", "0"], ["--hold", "-1"],
                                  ["--recovery", "0"], ["--concurrency", "0"],
                                  ["--database", "Bad-Name"]])
def test_the_mvcc_benchmark_refuses_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        bench_mvcc.parse_args(argv)
    assert "must be" in capsys.readouterr().err


async def test_the_overload_benchmark_runs_small(server_url, monkeypatch):
    """bench_overload with a small drain and a second of producers: every figure, and every
    item completed once."""
    monkeypatch.setenv("DATABASE_URL", server_url)
    args = bench_overload.parse_args(["--drain", "300", "--seconds", "1", "--batch", "10",
                                      "--database", "animus_bench_overload_smoke"])
    report = await bench_overload.run(args)
    section = report["sections"]["overload"]
    assert [r["label"] for r in section["results"] if r["value"] is None] == []
    checks = {c["label"]: c for c in section["checks"]}
    assert checks["items completed / submitted"]["value"] == 1.0
    assert checks["items run twice"]["value"] == 0
    # the server runs here, so its CPU is measured and the ceiling follows from it
    assert isinstance(checks["ceiling / drain rate (this machine)"]["value"], float)
    assert "overload" in bench_overload.render(report)
    json.dumps(report)


@pytest.mark.parametrize("argv", [["--drain", "0"], ["--seconds", "0"], ["--factor", "0"],
                                  ["--producers", "0"], ["--batch", "0"],
                                  ["--produce", "postgresql://x"]])
def test_the_overload_benchmark_refuses_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        bench_overload.parse_args(argv)
