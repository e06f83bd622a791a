"""The benchmarks' own instruments (the benchmarks themselves run from benchmarks/README.md)."""

from __future__ import annotations

from benchmarks.bench_engine import CpuMeter, CpuUse
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


def test_cpu_per_item_in_microseconds():
    use = CpuUse.between(1000, (2.0, 10.0), (2.5, 10.25))
    assert use.per_item() == (500.0, 250.0)


def test_cpu_per_item_without_the_server():
    use = CpuUse.between(4, (1.0, None), (1.002, None))
    assert use.server is None
    own, server = use.per_item()
    assert round(own) == 500
    assert server is None
