"""Every example in docs/ and the README runs, or says why it cannot (docs are the contract).

Each fenced code block is checked by its language:

* ``console`` and ``bash``: the commands run, in order, in a scratch directory of their page
  with its own database (a copy of the repository's ``faculties/``, ``animus`` and
  ``scripts/animus`` on the PATH); each must exit 0, or with the status the block shows after
  it (``$ echo $?``). Every ``animus`` command shown, run or not, must parse with the real
  argument parser, so no option or sub-command in the docs can drift from the program;
* ``python``: runs as a script in the same scratch directory and must exit 0;
* ``toml``: loads as animus would load it: a faculty file with the faculty loader, a rule file
  with the rules, a pipeline with the pipeline parser; anything else must at least parse;
* ``json``: parses (one document, or one per line);
* ``text``: output and layouts, not examples.

An HTML comment on the line before a block changes that:

* ``<!-- example: not run: REASON -->``: the block cannot run here (it needs Docker, a
  long-running daemon, an item from another database...); the reason is required;
* ``<!-- example: run by tests/FILE.py -->``: a named test runs it (checked: the test names the
  page and the block's section);
* ``<!-- example: file PATH -->``: the block is a file (written to PATH in the page's scratch
  directory for the blocks after it, after its own check).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import stat
import sys
import time
import tomllib
from pathlib import Path

import pytest

from tests.conftest import TEMPLATE, scratch_database
from tests.engine_helpers import process_gone, run_process
from tests.support import DocBlock, doc_blocks

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
LANGUAGES = {"console", "bash", "python", "toml", "json", "text"}
SHELL = {"console", "bash"}
RUNS = SHELL | {"python"}


def _blocks() -> list[DocBlock]:
    return [block for page in PAGES for block in doc_blocks(page)]


def _kind(block: DocBlock) -> tuple[str, str]:
    """(how the block is checked: run / not run / run by / file, the mark's argument)."""
    if block.mark is None:
        return ("run" if block.language in RUNS else "check"), ""
    for kind in ("not run:", "run by ", "file "):
        if block.mark.startswith(kind):
            return kind.rstrip(": "), block.mark[len(kind):].strip()
    raise AssertionError(f"{block.where}: unknown example mark {block.mark!r}: use 'not run: "
                         f"REASON', 'run by tests/FILE.py' or 'file PATH'")


def test_every_block_has_a_known_language_and_a_valid_mark():
    problems = []
    for block in _blocks():
        if block.language not in LANGUAGES:
            problems.append(f"{block.where}: code block language {block.language!r} is not one "
                            f"of {sorted(LANGUAGES)}")
            continue
        kind, arg = _kind(block)
        if kind == "not run" and len(arg.split()) < 3:
            problems.append(f"{block.where}: say why the example cannot run, in a few words")
        if kind == "run by":
            test = ROOT / arg
            title = block.heading.lstrip("#").strip()
            if not (test.is_file() and arg.startswith("tests/")):
                problems.append(f"{block.where}: {arg} is not a test file")
            elif Path(block.page).name not in (text := test.read_text("utf-8")) or title not in text:
                problems.append(f"{block.where}: {arg} does not name {block.page} and the "
                                f"section {title!r}: it cannot be the test that runs this block")
        if block.mark is not None and block.language == "text":
            problems.append(f"{block.where}: text blocks are output, not examples: no mark")
    assert not problems, "\n".join(problems)


def test_the_marks_say_what_runs():
    """A sanity check of the ledger itself: most examples run, and the count is visible."""
    kinds: dict[str, int] = {}
    for block in _blocks():
        if block.language in RUNS:
            kind = _kind(block)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
    ran = kinds.get("run", 0) + kinds.get("run by", 0)
    assert ran > kinds.get("not run", 0), kinds


# ---- every animus command shown parses ----------------------------------------------------

_CONTROL = {"|", "||", "&&", ";", ">", ">>", "2>", "2>&1", "&", "<"}


def _commands(block: DocBlock) -> list[tuple[int, str, list[str]]]:
    """The shell commands of a console or bash block: (line number, command, the lines shown
    after it), with a backslash continuation joined. Console blocks: the ``$ `` lines; bash:
    every line that is not a comment."""
    out: list[tuple[int, str, list[str]]] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line, number = lines[i], block.line + 1 + i
        i += 1
        if block.language == "console":
            if not line.startswith("$ "):
                if out:
                    out[-1][2].append(line)
                continue
            line = line[2:]
        elif not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\") and i < len(lines):
            line = line[:-1] + " " + lines[i].strip()
            i += 1
        out.append((number, line, []))
    return out


def _animus_argvs(command: str) -> list[list[str]]:
    """The argument lists of every ``animus`` invocation in one shell command line."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return []
    found: list[list[str]] = []
    current: list[str] | None = None
    for word in words:
        if word in _CONTROL or word.startswith(("$(", ">")):
            if current is not None:
                found.append(current)
            current = None
        elif current is not None:
            current.append(word)
        elif word in ("animus", "scripts/animus") or word.endswith("/bin/animus"):
            current = []
    if current is not None:
        found.append(current)
    return found


_AN_ID = "01a2f2b0-0000-7000-8000-000000000000"


def test_every_animus_command_shown_parses():
    from animus_core.cli import build_parser

    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    builtin = set(commands.choices)
    problems = []
    for block in _blocks():
        if block.language not in SHELL:
            continue
        for number, command, _ in _commands(block):
            for argv in _animus_argvs(command):
                if not argv or argv[0] not in builtin | {"--version", "--debug"}:
                    continue  # a plugin's command (docs/hooks.md's "hello")
                if argv[:2] == ["db", "psql"]:
                    argv = argv[:2]  # the rest goes to psql
                # a shell variable holding an id (a hook's "$ANIMUS_WORK_ID"): any id parses
                argv = [_AN_ID if "$" in a and "ID" in a.upper() else a for a in argv]
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    try:
                        parser.parse_args(argv)
                    except SystemExit as e:
                        if e.code:
                            problems.append(f"{block.page}:{number}: animus {shlex.join(argv)}: "
                                            f"{err.getvalue().strip().splitlines()[-1]}")
    assert not problems, "\n".join(problems)


# ---- TOML and JSON load as animus loads them ----------------------------------------------


def _check_toml(block: DocBlock, scratch: Path) -> None:
    from animus_core.faculties.pipelines import load as load_pipeline
    from animus_core.faculties.toml import load_file
    from animus_core.governance.rules import RuleSet

    try:
        data = tomllib.loads(block.text)
    except tomllib.TOMLDecodeError as e:
        raise AssertionError(f"{block.where}: malformed TOML: {e}") from None
    faculty = data.get("faculty")
    if isinstance(faculty, dict) and "name" in faculty:
        # The faculty loader checks its commands exist: give it stand-ins for the hooks.
        for phase in ("orient", "engage", "consolidate", "recover"):
            command = (faculty.get(phase) or {}).get("command")
            if command and "/" in (exe := shlex.split(command)[0]) and not os.path.isabs(exe):
                stub = scratch / exe
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.touch()
                stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
            prompt = (faculty.get(phase) or {}).get("system_prompt_file")
            if prompt and not os.path.isabs(prompt):
                (scratch / prompt).parent.mkdir(parents=True, exist_ok=True)
                (scratch / prompt).touch()
        path = scratch / "faculty.toml"
        path.write_text(block.text)
        load_file(path, cwd=scratch)
    elif "rule" in data:
        rules = scratch / f"rules-{block.line}"
        rules.mkdir()
        (rules / "rules.toml").write_text(block.text)
        RuleSet.load(rules)
    elif "pipeline" in data:
        path = scratch / "pipeline.toml"
        path.write_text(block.text)
        load_pipeline(path)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_toml_and_json_blocks_load(page, tmp_path):
    for block in doc_blocks(page):
        kind = _kind(block)[0]
        if kind in ("not run", "run by"):
            continue
        if block.language == "toml":
            scratch = tmp_path / str(block.line)
            scratch.mkdir()
            _check_toml(block, scratch)
        elif block.language == "json":
            try:
                json.loads(block.text)
            except json.JSONDecodeError:
                for n, line in enumerate(block.text.splitlines(), block.line + 1):
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        raise AssertionError(f"{block.page}:{n}: not JSON: {e}") from None


# ---- the examples run -------------------------------------------------------------------------

# `animus up` or `animus mcp --bind` (or `scripts/animus ...`), after any VAR=value: a daemon,
# started in the background
_DAEMON = re.compile(r"^((?:\w+=\S+ )*)(scripts/)?animus (?:up|mcp --bind)\b")


def _script(block: DocBlock) -> str:
    """The block's commands as one bash script that stops at the first unexpected status:
    0, or the one the block shows with ``$ echo $?`` after the command. ``animus up`` and
    ``animus mcp --bind`` start in the background and run for the rest of the page, as in a
    terminal of their own."""
    commands = _commands(block)
    # 0, or any failure for a command shown printing an error, or what `echo $?` shows
    expected = ["1-255" if shown and shown[0].startswith("animus: error:") else "0"
                for _, _, shown in commands]
    for n, (_, command, shown) in enumerate(commands):
        if command.strip() == "echo $?" and n and shown and shown[0].strip().isdigit():
            expected[n - 1] = shown[0].strip()
    lines = ["set -o pipefail"]
    for (number, command, _), status in zip(commands, expected, strict=True):
        if command.strip() == "echo $?":
            continue
        if m := _DAEMON.match(command):
            # the daemon runs on, for the rest of the page (stopped by the test at its end)
            words = shlex.split(command, comments=True)
            assigned = len((m[1] or "").split())
            lines.append(f"{shlex.join(words[:assigned])} setsid {shlex.join(words[assigned:])} "
                         f"> daemon-{number}.log 2>&1 < /dev/null & echo $! >> daemons")
            # on once it left this script's session: the script's end kills its session
            lines.append('while [ -e /proc/$! ] && [ "$(cut -d" " -f6 /proc/$!/stat)" != "$!" ]; '
                         "do sleep 0.01; done")
            continue
        test = '[ "$__s" = 0 ]' if status == "1-255" else f'[ "$__s" != {status} ]'
        lines += [command,
                  f'__s=$?; if {test}; then echo "line {number} exited $__s '
                  f'(expected {status}): "{shlex.quote(command[:200])} >&2; exit 97; fi']
    return "\n".join(lines) + "\n"


def _sandbox(root: Path, db_url: str) -> tuple[Path, dict[str, str]]:
    shutil.copytree(ROOT / "faculties", root / "faculties")
    (root / "scripts").mkdir()
    shim = root / "scripts" / "animus"
    shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m animus_core "$@"\n')
    shim.chmod(0o755)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    (bin_dir / "animus").symlink_to(shim)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "COV_", "ANIMUS_"))}
    env.update(DATABASE_URL=db_url, ANIMUS_HOME=str(root / "home"), HOME=str(root),
               PATH=f"{bin_dir}:{Path(sys.executable).parent}:{env.get('PATH', '')}")
    return root, env


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
async def test_the_examples_of_each_page_run(page, tmp_path, server_url, template_url):
    blocks = [b for b in doc_blocks(page) if _kind(b)[0] in ("run", "file")]
    if not any(_kind(b)[0] == "run" for b in blocks):
        pytest.skip(f"{page.name} has no example that runs here")
    async with scratch_database(server_url, template=TEMPLATE) as db_url:
        root, env = _sandbox(tmp_path, db_url)
        try:
            for block in blocks:
                await _run_block(block, root, env)
        finally:
            await asyncio.to_thread(_stop_daemons, root)


async def _run_block(block: DocBlock, root: Path, env: dict[str, str]) -> None:
    argv = _prepare(block, root)
    if argv is None:
        return
    try:
        code, out, err = await run_process(argv, env, root, 120)
    except AssertionError as e:  # out of time
        raise AssertionError(f"{block.where}: {e}{_daemon_logs(root)}") from None
    assert code == 0, (f"{block.where} ({block.language}, under {block.heading!r}) exited "
                       f"{code}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
                       f"{_daemon_logs(root)}")


def _prepare(block: DocBlock, root: Path) -> list[str] | None:
    """Write a file block where it goes (None), or the script that runs the block (its argv)."""
    kind, arg = _kind(block)
    if kind == "file":
        path = root / arg
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.text)
        if block.text.startswith("#!"):
            path.chmod(0o755)
        return None
    if block.language == "python":
        script = root / f"example_{block.line}.py"
        script.write_text(block.text)
        return [sys.executable, str(script)]
    script = root / f"example_{block.line}.sh"
    script.write_text(_script(block))
    return ["bash", str(script)]


def _daemon_logs(root: Path) -> str:
    return "".join(f"\n--- {log.name}\n{log.read_text()[-2000:]}"
                   for log in sorted(root.glob("daemon-*.log")))


def _stop_daemons(root: Path) -> None:
    """Stop the page's daemons as Ctrl-C does (they drain), then for good."""
    pids = [int(p) for p in (root / "daemons").read_text().split()] \
        if (root / "daemons").exists() else []
    for sig in (signal.SIGINT, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(process_gone(p) for p in pids):
            time.sleep(0.1)
