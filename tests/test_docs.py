"""The user documentation in docs/ keeps up with the code.

* every plugin hook spec has a ``## name`` section in docs/hooks.md naming all its
  arguments, and no such section describes a hook that does not exist;
* every ``animus`` command and sub-command has a heading in docs/cli.md;
* every environment variable animus reads is named in docs/configuration.md, and the
  command hook contract's variables in docs/hook-contract.md;
* every relative link between the pages resolves, anchors included.

No database is needed.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path

import pluggy
import pytest

from animus_core.faculties import contract as hookspecs
from animus_core.faculties import toml as toml_faculties
from animus_core.infra.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SOURCE = ROOT / "animus_core"

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
_LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
_INLINE_CODE = re.compile(r"`+[^`\n]*`+")


def read(name: str) -> str:
    path = DOCS / name
    assert path.is_file(), f"docs/{name} is missing"
    return path.read_text("utf-8")


def without_code_blocks(text: str) -> str:
    """The text with fenced code blocks blanked out (a ``# comment`` there is no heading),
    keeping every offset, so that positions in it are positions in ``text``."""
    return _FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def headings(text: str) -> list[tuple[int, str]]:
    return [(len(m[1]), m[2]) for m in _HEADING.finditer(without_code_blocks(text))]


def sections(text: str, level: int) -> dict[str, str]:
    """``{title: body}`` for every heading of exactly ``level``; a body ends at the next
    heading of the same or a higher level."""
    clean = without_code_blocks(text)
    found = [m for m in _HEADING.finditer(clean) if len(m[1]) <= level]
    out: dict[str, str] = {}
    for i, m in enumerate(found):
        if len(m[1]) != level:
            continue
        end = found[i + 1].start() if i + 1 < len(found) else len(text)
        out[m[2]] = text[m.end():end]  # the body as written, code blocks included
    return out


def slug(title: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = title.strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in headings(text):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# -- 1. plugin hooks -------------------------------------------------------------------------


def hook_specs() -> dict[str, tuple[str, ...]]:
    pm = pluggy.PluginManager("animus")
    pm.add_hookspecs(hookspecs)
    specs: dict[str, tuple[str, ...]] = {}
    for name, caller in vars(pm.hook).items():
        if isinstance(caller, pluggy.HookCaller) and caller.spec is not None:
            specs[name] = tuple(caller.spec.argnames) + tuple(caller.spec.kwargnames)
    return specs


def test_hook_specs_are_found() -> None:
    marked = {n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, "animus_spec")}
    assert marked, "no function in animus_core.faculties.contract carries the animus_spec marker"
    assert set(hook_specs()) == marked


@pytest.mark.parametrize("hook", sorted(hook_specs()))
def test_every_hook_has_a_section_naming_its_arguments(hook: str) -> None:
    found = sections(read("hooks.md"), 2)
    assert hook in found, f"docs/hooks.md has no '## {hook}' section"
    body = found[hook]
    for arg in hook_specs()[hook]:
        assert re.search(rf"\b{re.escape(arg)}\b", body), (
            f"the '## {hook}' section of docs/hooks.md does not mention the argument {arg!r}"
        )


def test_no_section_for_a_hook_that_does_not_exist() -> None:
    specs = hook_specs()
    named_like_hooks = [t for t in sections(read("hooks.md"), 2) if re.fullmatch(r"\w+", t)]
    unknown = [t for t in named_like_hooks if t not in specs]
    assert not unknown, f"docs/hooks.md describes hooks that do not exist: {unknown}"


# -- 2. the command line ----------------------------------------------------------------------


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], bool]]:
    """``(path, is_leaf)`` for every sub-command below ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = any(isinstance(a, argparse._SubParsersAction) for a in sub._actions)
                yield (*path, name), not nested
                yield from walk(sub, (*path, name))


@pytest.fixture
def commands(monkeypatch: pytest.MonkeyPatch) -> list[tuple[tuple[str, ...], bool]]:
    # animus's own commands: installed third-party plugins may add more (register_commands),
    # which are theirs to document.
    monkeypatch.setenv("ANIMUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    from animus_core.cli import build_parser

    found = list(walk(build_parser()))
    assert found, "build_parser() has no sub-commands"
    return found


def test_every_command_has_a_heading(commands: list[tuple[tuple[str, ...], bool]]) -> None:
    titles = headings(read("cli.md"))
    level3 = {t for level, t in titles if level == 3}
    anywhere = {t for _, t in titles}
    missing = []
    for path, leaf in commands:
        title = " ".join(("animus", *path))
        if leaf and title not in level3:
            missing.append(f"### {title}")
        elif not leaf and title not in anywhere:
            missing.append(f"a heading '{title}'")
    assert not missing, f"docs/cli.md lacks: {', '.join(missing)}"


def test_every_option_and_argument_has_help_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many options had none (--json, --dedup-key, --max-attempts, --queue, -k, --batch,
    --reason): ``animus ... --help`` is the first place a person looks."""
    monkeypatch.setenv("ANIMUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    from animus_core.cli import build_parser

    def bare(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[str]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from bare(sub, (*path, name))
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction) \
                    and not action.help:
                yield f"animus {' '.join(path)} {'/'.join(action.option_strings) or action.dest}"

    missing = list(bare(build_parser()))
    assert not missing, f"options without help text: {', '.join(missing)}"


def test_every_usage_block_is_the_commands_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``usage:`` under each command's heading is what ``--help`` prints (at 100
    columns): options added to a command show up in its documentation, or this fails."""
    monkeypatch.setenv("ANIMUS_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("COLUMNS", "100")
    from animus_core.cli import build_parser

    def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                ) -> Iterator[tuple[str, argparse.ArgumentParser]]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield " ".join(("animus", *path, name)), sub
                    yield from parsers(sub, (*path, name))

    usage = {title: sub.format_usage().strip() for title, sub in parsers(build_parser())}
    blocks = re.findall(r"### (animus[^\n]*)\n\n```text\n(usage: [^`]*?)\n```", read("cli.md"))
    assert len(blocks) > 40
    wrong = [title for title, block in blocks if title in usage and usage[title] != block]
    assert not wrong, f"docs/cli.md shows another usage than the command for: {wrong}"


def test_the_error_tree_names_every_public_error() -> None:
    """python-api.md's tree of errors lacked PermissionDenied: every error a caller can meet
    (the values' errors, and the faculty-facing ones of child work) is in it."""
    import animus_core.values.children as children
    import animus_core.values.errors as errors

    tree = read("python-api.md").split("AnimusError\n", 1)[1].split("```", 1)[0]
    named = set(re.findall(r"[├└]── (\w+)", tree))
    public = {name for module in (errors, children) for name, obj in vars(module).items()
              if isinstance(obj, type) and issubclass(obj, errors.AnimusError)
              and obj is not errors.AnimusError and obj.__module__ == module.__name__}
    assert public - named == set(), f"python-api.md's error tree lacks {public - named}"
    assert named - public == set(), f"python-api.md names errors that do not exist: {named - public}"


def test_migration_examples_list_the_migrations_there_are() -> None:
    """The ``db migrate`` and ``db status`` examples listed 0001-0005 long after 0006."""
    names = sorted(p.stem for p in (ROOT / "animus_core" / "store" / "sql" / "migrations")
                   .glob("*.sql"))
    cli = read("cli.md")
    assert re.findall(r"^applied (\d{4}_\w+)$", cli, re.MULTILINE) == names
    for page in ("cli.md", "operations.md"):
        for line in re.findall(r"^applied: +(.*)$", read(page), re.MULTILINE):
            assert line == ", ".join(n[:4] for n in names), (page, line)


def test_no_heading_for_a_command_that_does_not_exist(
        commands: list[tuple[tuple[str, ...], bool]]) -> None:
    known = {" ".join(("animus", *path)) for path, _ in commands}
    documented = {t for level, t in headings(read("cli.md")) if level == 3 and t.startswith("animus ")}
    assert documented <= known, f"docs/cli.md documents unknown commands: {documented - known}"


# -- 3. environment variables ----------------------------------------------------------------

# env.get("X"), os.environ.get("X"), getenv("X"), env["X"] / os.environ["X"] unless assigned to
_ENV_READ = re.compile(
    r"""(?:\benviron|\benv)\.get\(\s*["']([A-Z][A-Z0-9_]*)["']"""
    r"""|(?:\benviron|\benv)\[\s*["']([A-Z][A-Z0-9_]*)["']\s*\](?!\s*=[^=])"""
    r"""|\bgetenv\(\s*["']([A-Z][A-Z0-9_]*)["']"""
)


class RecordingEnv(Mapping[str, str]):
    """An empty environment that remembers every name looked up in it."""

    def __init__(self) -> None:
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def env_vars_read() -> set[str]:
    names: set[str] = set()
    for path in SOURCE.rglob("*.py"):
        for m in _ENV_READ.finditer(path.read_text("utf-8")):
            names.add(m[1] or m[2] or m[3])
    recorder = RecordingEnv()
    Settings.from_env(recorder)  # catches names passed to helpers, not only literal .get()s
    return names | recorder.asked


def test_env_vars_are_found() -> None:
    assert {"DATABASE_URL", "ANIMUS_HOME", "LOG_LEVEL"} <= env_vars_read()


def test_every_env_var_read_is_documented() -> None:
    text = read("configuration.md")
    missing = sorted(n for n in env_vars_read() if not re.search(rf"\b{n}\b", text))
    assert not missing, f"docs/configuration.md does not mention {missing}"


def test_hook_contract_names_every_hook_variable() -> None:
    text = read("hook-contract.md")
    names = {*toml_faculties.CONTRACT_ENV, *toml_faculties.BASE_ENV,
             "ANIMUS_ERROR", "ANIMUS_FAILED_PHASE"}
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", text))
    assert not missing, f"docs/hook-contract.md does not mention {missing}"


# -- 4. links --------------------------------------------------------------------------------


def links() -> Iterator[tuple[str, str]]:
    for page in sorted(DOCS.glob("*.md")):
        text = _INLINE_CODE.sub("", without_code_blocks(page.read_text("utf-8")))
        for m in _LINK.finditer(text):
            yield page.name, m[1]


def test_docs_exist_and_link_to_each_other() -> None:
    pages = {p.name for p in DOCS.glob("*.md")}
    assert "index.md" in pages
    linked = {target.split("#")[0] for page, target in links() if page == "index.md"}
    assert pages - {"index.md"} <= linked, f"index.md does not link to {pages - linked - {'index.md'}}"


@pytest.mark.parametrize(("page", "target"), sorted(set(links())))
def test_relative_link_resolves(page: str, target: str) -> None:
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
        return
    file, _, anchor = target.partition("#")
    path = (DOCS / page).parent / file if file else DOCS / page
    assert path.exists(), f"docs/{page} links to {target}, which does not exist"
    if anchor and path.suffix == ".md":
        assert anchor in anchors(path.read_text("utf-8")), (
            f"docs/{page} links to {target}, but {path.name} has no heading with that anchor"
        )
