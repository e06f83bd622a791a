"""``animus faculty``: list, check and scaffold faculties."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from animus_core.cli.output import print_json, print_table
from animus_core.faculties.faculty import Faculty
from animus_core.faculties.llm import collect_tools
from animus_core.faculties.toml import CommandFaculty
from animus_core.infra.config import Settings
from animus_core.values.errors import ConfigError, InvalidInput


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fac = sub.add_parser("faculty", help="list, check and scaffold faculties")
    cmds = fac.add_subparsers(dest="faculty_command", metavar="COMMAND", required=True)
    p = cmds.add_parser("list", help="every faculty, its work types and where it came from")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=list_)
    p = cmds.add_parser("check", help="validate plugins and TOML faculties without starting")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=check)
    p = cmds.add_parser("new", help="scaffold a pip-installable Python faculty package")
    p.add_argument("name", help="faculty name, e.g. translate")
    p.add_argument("--dir", type=Path, default=Path("plugins"), help="where to create it")
    p.set_defaults(handler=new)


async def list_(args: argparse.Namespace) -> int:
    from animus_core.cli.context import load_faculties

    _, faculties, problems = await load_faculties(Settings.from_env())
    if args.json:
        print_json({"faculties": [{"name": f.name, "accepts": list(f.accepts),
                                   "max_concurrent": f.max_concurrent, "origin": f.origin,
                                   "description": f.describe()} for f in faculties],
                    "problems": [{"plugin": p.plugin, "error": p.error} for p in problems]})
        return 0
    print_table(["faculty", "accepts", "limit", "origin"],
                [(f.name, ",".join(f.accepts), f.max_concurrent, f.origin) for f in faculties])
    for p in problems:
        print(f"problem: {p.plugin}: {p.error}")
    return 0


async def check(args: argparse.Namespace) -> int:
    from animus_core.cli.context import load_faculties

    settings = Settings.from_env()
    pm, faculties, problems = await load_faculties(settings)
    # each problem once, however many ways it was found
    lines = list(dict.fromkeys(
        line if p.plugin.startswith("animus") else f"{p.plugin}: {line}"
        for p in problems for line in p.error.splitlines()))
    lines += _tool_problems(pm, list(faculties))
    if args.json:
        print_json({"faculties": [{"name": f.name, "origin": f.origin} for f in faculties],
                    "problems": lines})
        return 2 if lines else 0
    for f in faculties:
        print(f"ok       {f.name} ({f.origin})")
    for line in lines:
        print(f"error    {line}")
    if lines:
        print(f"{len(lines)} problem(s) found")
        return 2
    print(f"{len(faculties)} faculties, no problems")
    return 0


def _tool_problems(pm: Any, faculties: list[Faculty]) -> list[str]:
    """The tools a TOML faculty's engage names that no plugin registers (the engage would
    fail on its first item), and tools registered twice."""
    try:
        tools = collect_tools(pm)
    except ConfigError as e:
        return [str(e)]
    out = []
    for f in faculties:
        engage = f.spec.engage if isinstance(f, CommandFaculty) else None
        for name in engage.tools if engage is not None else ():
            if name not in tools:
                out.append(f"{f.origin}: faculty.engage.tools: no tool is named {name!r} "
                           f"(known: {', '.join(sorted(tools)) or 'none'})")
    return out


_PYPROJECT = '''[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "animus-faculty-{name}"
version = "0.1.0"
description = "The {name} faculty for animus"
requires-python = ">=3.11"
dependencies = ["animus-substrate"]

[project.optional-dependencies]
test = ["pytest>=8", "pytest-asyncio>=0.24"]

[project.entry-points.animus]
{name} = "{module}"

[tool.pytest.ini_options]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
'''

_MODULE = '''"""The {name} faculty: what it does, in one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from animus_core import Faculty, Focus, hookimpl


class {cls}(Faculty):
    """Describe the faculty here: `animus faculty list --json` shows this docstring."""

    name = "{name}"
    accepts = ("{name}",)
    max_concurrent = 2
    example = {{"text": "hello"}}

    async def orient(self, focus: Focus) -> Any:
        text = focus.params.get("text")
        if not isinstance(text, str) or not text:
            raise ValueError("params.text must be a non-empty string")
        return {{"text": text}}

    async def engage(self, focus: Focus, oriented: Any) -> Any:
        return {{"length": len(oriented["text"])}}

    async def consolidate(self, focus: Focus, engaged: Any) -> Any:
        return engaged


@hookimpl
def register_faculties(register: Callable[[Faculty], None]) -> None:
    register({cls}())
'''

_TEST = '''from types import SimpleNamespace

import pytest

from {module} import {cls}


async def test_engage_measures_text():
    fac = {cls}()
    focus = SimpleNamespace(params={{"text": "hello"}})
    oriented = await fac.orient(focus)
    assert await fac.engage(focus, oriented) == {{"length": 5}}


async def test_orient_rejects_missing_text():
    with pytest.raises(ValueError, match="params.text"):
        await {cls}().orient(SimpleNamespace(params={{}}))
'''


async def new(args: argparse.Namespace) -> int:
    name = args.name
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", name):
        raise InvalidInput(f"faculty name {name!r}: use lowercase letters, digits and _")
    module = f"animus_faculty_{name}"
    cls = "".join(part.capitalize() for part in name.split("_"))
    root = args.dir / f"animus-faculty-{name.replace('_', '-')}"
    if root.exists():
        raise ConfigError(f"{root} already exists")
    (root / module).mkdir(parents=True)
    (root / "tests").mkdir()
    values = {"name": name, "module": module, "cls": cls}
    (root / "pyproject.toml").write_text(_PYPROJECT.format(**values))
    (root / module / "__init__.py").write_text(_MODULE.format(**values))
    (root / module / "py.typed").write_text("")
    (root / "tests" / f"test_{name}.py").write_text(_TEST.format(**values))
    (root / "README.md").write_text(
        f"# animus-faculty-{name}\n\nInstall: `pip install ./{root}`; then "
        f"`animus faculty list` shows `{name}`.\n")
    print(f"created {root}\nnext: pip install -e {root} && animus faculty list")
    return 0
