"""What animus adds to a call of an MCP server's tool: the same stdio server (the test
server of tests/mcp_server.py, started twice), called through the SDK's own client directly
and through animus's MCP tools (the engine's connection, the tool the model's loop calls:
redaction, the size check, the error handling), in alternating pairs, once both are started.

    .venv/bin/python -m benchmarks.bench_mcp [--calls N] [--quick] [--json PATH]

Target: the p50 of the added latency (animus's call minus the direct one of the same pair)
<= 2 ms. Not counted: the durable step that records each call in a focus (a database
commit; see bench_waits for what a step costs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from animus_core.infra import loop
from benchmarks.bench_engine import Check, Line, Section, machine, percentile, publish, render_section

SERVER = str(Path(__file__).resolve().parent.parent / "tests" / "mcp_server.py")


async def run(calls: int) -> dict[str, Any]:
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    from animus_core.faculties.llm import _call_tool
    from animus_core.faculties.mcp import McpTools
    from animus_core.values.mcp import McpServer

    load_start = os.getloadavg()
    started = time.monotonic()
    spec = McpServer(name="bench", command=sys.executable, args=[SERVER], tools=["echo"])
    pool = McpTools()
    direct_ms: list[float] = []
    animus_ms: list[float] = []
    added: list[float] = []
    try:
        async with Client(StdioServerParameters(command=sys.executable, args=[SERVER])) as client:
            tool = (await pool.tools([spec]))["mcp__bench__echo"]
            for _ in range(20):  # both warm
                await client.call_tool("echo", {"text": "warm"})
                await _call_tool(tool, {"text": "warm"}, None)
            for i in range(calls):
                text = f"call {i}"
                t0 = time.perf_counter()
                await client.call_tool("echo", {"text": text})
                t1 = time.perf_counter()
                out, is_error = await _call_tool(tool, {"text": text}, None)
                t2 = time.perf_counter()
                assert (out, is_error) == (text, False), out
                direct_ms.append((t1 - t0) * 1000)
                animus_ms.append((t2 - t1) * 1000)
                added.append(animus_ms[-1] - direct_ms[-1])
    finally:
        await pool.close()
    load = os.getloadavg()
    section = Section(
        key="calls", title=f"1. a tool call, {calls} pairs",
        setup=[f"one stdio server each ({Path(SERVER).name}, the mcp SDK's MCPServer), started "
               "and warmed (20 calls) before the pairs",
               "each pair: the SDK's Client.call_tool('echo'), then animus's tool for it (as "
               "the model's loop calls it), back to back"],
        lines=[Line("direct (SDK client) p50", percentile(direct_ms, 50), "ms"),
               Line("direct (SDK client) p99", percentile(direct_ms, 99), "ms"),
               Line("through animus p50", percentile(animus_ms, 50), "ms"),
               Line("through animus p99", percentile(animus_ms, 99), "ms"),
               Line("added by animus p50 (per pair)", percentile(added, 50), "ms"),
               Line("added by animus p99 (per pair)", percentile(added, 99), "ms")],
        checks=[Check("added latency p50, ms", percentile(added, 50), 2.0, "<=", "ms")],
        notes=["not counted: the durable step recording each call in a focus"])
    section.seconds = time.monotonic() - started
    return {
        "benchmark": "mcp",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": {"calls": calls},
        "machine": {**machine(), "load_average_start": [round(x, 2) for x in load_start],
                    "load_average_end": [round(x, 2) for x in load]},
        "sections": {"calls": section.to_json()},
        "total_seconds": round(time.monotonic() - started, 3),
    }


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["animus MCP tool-call benchmark",
             f"  machine     {m['cpu_count']} cores, {m['platform']}, Python {m['python']}",
             f"  load avg    {' '.join(map(str, m['load_average_start']))} at the start, "
             f"{' '.join(map(str, m['load_average_end']))} at the end (1, 5, 15 min)"]
    for s in report["sections"].values():
        lines += render_section(s)
    lines.append(f"  time        {report['total_seconds']:.1f} s in all")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_mcp",
                                description="what animus adds to a call of an MCP tool")
    p.add_argument("--calls", type=int, default=1000, help="pairs of calls (default 1000)")
    p.add_argument("--quick", action="store_true", help="a smoke run (50 pairs)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers here")
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error("--calls must be at least 1")
    report = loop.run(run(50 if args.quick else args.calls))
    return publish(render(report), report, args.json)


if __name__ == "__main__":
    sys.exit(main())
