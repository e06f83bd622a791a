"""``animus step NAME -- COMMAND ARGS...``: inside a command hook, run COMMAND once per work
item as the durable step NAME (docs/hook-contract.md, "animus step").

The engine that runs the hook records the step: this command asks it (at
``ANIMUS_STEP_ADDRESS``, with ``ANIMUS_STEP_TOKEN``) for step NAME's record. A recorded step
is replayed: its standard output is printed and its exit status returned, and COMMAND does
not run. Otherwise COMMAND runs (its standard error passes through), and its standard output
and exit status are recorded before they are printed and returned.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from typing import Any

import msgspec

from animus_core.faculties.durable_hooks import ADDRESS_VAR, TOKEN_VAR, write_frame
from animus_core.values.errors import AnimusError, ConfigError, PhaseFailed

__all__ = ["add_commands", "run_fast", "step"]

USAGE = "animus step NAME -- COMMAND [ARGS...]"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the step's name (its position in the hook says which it is)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then the command and its arguments")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("step", help="inside a command hook: run a command once per work item, "
                                    "replaying its output on later attempts",
                       usage=USAGE)
    add_arguments(p)
    p.set_defaults(handler=handler)


async def handler(args: argparse.Namespace) -> int:
    return step(args.name, args.command)


def run_fast(argv: list[str]) -> int:
    """``animus step ...`` without building the whole command line (it runs in hooks)."""
    parser = argparse.ArgumentParser(prog="animus step", usage=USAGE)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return step(args.name, args.command)
    except AnimusError as e:
        print(f"animus: error: {e}", file=sys.stderr)
        return e.exit_code


class StepRefused(PhaseFailed):
    """The engine refused or could not record the step."""


def step(name: str, command: list[str]) -> int:
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise ConfigError(f"give the command to run: {USAGE}")
    address, token = os.environ.get(ADDRESS_VAR), os.environ.get(TOKEN_VAR)
    if not address or not token:
        raise ConfigError(f"animus step runs inside an orient, engage or consolidate hook, "
                          f"whose engine sets {ADDRESS_VAR} and {TOKEN_VAR}; they are not set "
                          "here")
    host, _, port = address.rpartition(":")
    try:
        conn = socket.create_connection((host, int(port)))
    except (OSError, ValueError) as e:
        raise ConfigError(f"animus step cannot reach the engine at {ADDRESS_VAR}={address}: "
                          f"{getattr(e, 'strerror', None) or e} (it serves a hook's steps while "
                          "the hook runs)") from None
    with conn:
        _send(conn, msgspec.json.encode({"token": token, "name": name}))
        answer = _receive(conn)
        if "replay" in answer:
            result = answer["replay"]
        elif "run" in answer:
            ran = _run(name, command, int(answer["limit"]))
            if isinstance(ran, int):
                return ran  # not recorded
            status, stdout = ran
            _send(conn, msgspec.json.encode({"status": status}))
            _send(conn, stdout)
            answer = _receive(conn)
            if "result" not in answer:
                raise StepRefused(f"step {name!r} was not recorded: {answer.get('error')}")
            result = answer["result"]
        else:
            raise StepRefused(f"step {name!r}: {answer.get('error')}")
    sys.stdout.write(result["stdout"])
    sys.stdout.flush()
    return int(result["status"])


def _run(name: str, command: list[str], limit: int) -> tuple[int, bytes] | int:
    """Run the command: its exit status and standard output, or (not to be recorded) the
    status to exit with."""
    try:
        proc = subprocess.run(command, stdout=subprocess.PIPE, check=False)
    except OSError as e:
        print(f"animus: error: step {name!r}: {command[0]} could not start: {e.strerror} "
              "(nothing recorded)", file=sys.stderr)
        return 127
    if proc.returncode < 0:
        print(f"animus: error: step {name!r}: {command[0]} was killed by signal "
              f"{-proc.returncode} (nothing recorded)", file=sys.stderr)
        return 128 - proc.returncode
    if len(proc.stdout) > limit:
        print(f"animus: error: step {name!r}: its standard output is {len(proc.stdout)} bytes, "
              f"over the limit of {limit} (ANIMUS_MAX_OUTCOME_BYTES): write large output to a "
              "file and print its name (nothing recorded)", file=sys.stderr)
        return 1
    try:
        proc.stdout.decode("utf-8")
    except UnicodeDecodeError as e:
        print(f"animus: error: step {name!r}: its standard output is not UTF-8 text "
              f"({e.reason} at byte {e.start}): encode it, with base64 for example (nothing "
              "recorded)", file=sys.stderr)
        return 1
    return proc.returncode, proc.stdout


def _send(conn: socket.socket, body: bytes) -> None:
    write_frame(conn.sendall, body)


def _receive(conn: socket.socket) -> dict[str, Any]:
    head = _exactly(conn, 4)
    body = _exactly(conn, int.from_bytes(head, "big"))
    value = msgspec.json.decode(body)
    assert isinstance(value, dict)
    return value


def _exactly(conn: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(size - got, 1 << 20))
        if not chunk:
            raise StepRefused("the engine closed the connection before it answered: the hook "
                              "run that ANIMUS_STEP_TOKEN names has ended, the token is no "
                              "running hook's, or the engine stops. Call animus step only "
                              "from the hook the engine started, with the environment it gave "
                              "that hook")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
