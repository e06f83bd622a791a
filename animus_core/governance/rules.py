"""Rules and approval gates, declared in files (``ANIMUS_RULES``, default ``rules/``).

    [[rule]]
    name = "production deploys need two approvers"
    work_type = "deploy"          # fnmatch pattern; omitted: any type
    source = "*"                  # fnmatch pattern on the submitter's source; omitted: any
    params = { env = "prod" }     # the params must contain this (JSON containment)
    effect = "require_approval"   # allow | deny | require_approval
    role = "approver"             # who may approve (a database role, see animus roles)
    quorum = 2                    # how many distinct people
    reason = "two people look at every production deploy"

    [[rule]]
    name = "payments need a person"
    tool = "pay_*"                # governs a model's calls of matching tools instead
    effect = "require_approval"

Rules are checked in order (files by name, rules in file order); the first that matches
decides. When rule files exist and none matches, the work is denied: governance fails
closed. :meth:`RuleSet.decide` is the one evaluation: when work is submitted (through
:mod:`animus_core.governance.work`), again before its engage phase, and when a pipeline is
planned.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import msgspec

from animus_core.infra.toml_files import load_toml
from animus_core.store.roles import check_gate_role
from animus_core.values.errors import ConfigError

__all__ = ["Decision", "Rule", "RuleSet"]

Effect = Literal["allow", "deny", "require_approval"]


class Rule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: str
    effect: Effect
    work_type: str = "*"
    source: str = "*"
    params: dict[str, Any] = {}
    reason: str = ""
    role: str = "approver"
    quorum: int = 1
    #: a pattern on a tool's name: the rule governs the model's calls of that tool in a
    #: Claude engage loop (``params`` then matches the call's input), not submitted work
    tool: str | None = None


class _RuleFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rule: list[Rule] = []


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """What the rules say of one item: ``allow``, ``deny`` (with the reason), or
    ``require_approval`` (with the rule, the role whose members approve and the quorum)."""

    effect: Effect
    rule: str | None
    reason: str
    role: str | None = None
    quorum: int = 1

    def gate(self) -> dict[str, Any]:
        return {"rule": self.rule, "role": self.role, "quorum": self.quorum,
                "reason": self.reason}


def _contains(have: Any, want: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and _contains(have[k], v)
                                              for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and all(any(_contains(h, w) for h in have) for w in want)
    return bool(have == want)


class RuleSet:
    """The rules, in order, each with the file it came from; immutable once loaded."""

    __slots__ = ("_rules",)

    def __init__(self, rules: Iterable[tuple[str, Rule]] = ()) -> None:
        self._rules = tuple(rules)

    @property
    def rules(self) -> tuple[tuple[str, Rule], ...]:
        return self._rules

    @classmethod
    def load(cls, directory: Path) -> RuleSet:
        rules: list[tuple[str, Rule]] = []
        if not directory.is_dir():
            return cls(rules)
        for path in sorted(directory.glob("*.toml")):
            parsed = load_toml(path, _RuleFile)
            for i, rule in enumerate(parsed.rule):
                where = f"{path}: rule[{i}] ({rule.name})"
                if rule.effect == "deny" and not rule.reason:
                    raise ConfigError(f"{where}: a deny rule needs a reason")
                if rule.quorum < 1:
                    raise ConfigError(f"{where}: quorum must be at least 1")
                check_gate_role(rule.role, where)
                rules.append((str(path), rule))
        return cls(rules)

    @property
    def active(self) -> bool:
        """Whether any rule governs submitted work (tool rules do not)."""
        return any(rule.tool is None for _, rule in self.rules)

    def decide(self, work_type: str, params: dict[str, Any], source: str) -> Decision:
        """The decision for work of ``work_type`` with ``params`` from ``source``: the first
        rule that matches decides; no rules allow everything; rules and no match deny. Tool
        rules take no part."""
        if not self.active:  # tool rules alone govern no submitted work
            return Decision(effect="allow", rule=None, reason="no rules configured")
        for _, rule in self.rules:
            if (rule.tool is None
                    and fnmatch.fnmatchcase(work_type, rule.work_type)
                    and fnmatch.fnmatchcase(source, rule.source)
                    and _contains(params, rule.params)):
                return _decision(rule)
        return Decision(effect="deny", rule=None,
                        reason=f"no rule allows {work_type!r} from {source!r} (rules fail closed)")

    def explain(self, work_type: str, params: dict[str, Any], source: str, *,
                tool: str | None = None) -> list[tuple[str, Rule, str | None]]:
        """How the rules decide work of ``work_type`` (or, with ``tool``, a model's call of
        that tool with ``params`` as its input): each rule in order up to the one that
        matches, with why it does not match (None: it matches and decides)."""
        out: list[tuple[str, Rule, str | None]] = []
        for path, rule in self.rules:
            miss = _mismatch(rule, work_type, params, source, tool)
            out.append((path, rule, miss))
            if miss is None:
                break
        return out

    def shadowed(self) -> list[tuple[str, Rule, str, Rule]]:
        """Rules that can never match, each with the earlier rule that matches all that it
        would: ``(path, rule, earlier path, earlier rule)``. The first matching rule
        decides, across files in name order."""
        out = []
        for i, (path, rule) in enumerate(self.rules):
            for earlier_path, earlier in self.rules[:i]:
                if _covers(earlier, rule):
                    out.append((path, rule, earlier_path, earlier))
                    break
        return out

    def decide_tool(self, tool: str, tool_input: Any, *, work_type: str,
                    source: str) -> Decision:
        """The decision for a model's call of ``tool`` with ``tool_input``, in the focus of
        an item of ``work_type`` from ``source``: the first tool rule (a rule with ``tool``)
        that matches decides (its ``params`` are matched against the input). Tool rules
        are opt-in: a call that no tool rule matches is allowed."""
        for _, rule in self.rules:
            if (rule.tool is not None
                    and fnmatch.fnmatchcase(tool, rule.tool)
                    and fnmatch.fnmatchcase(work_type, rule.work_type)
                    and fnmatch.fnmatchcase(source, rule.source)
                    and _contains(tool_input, rule.params)):
                return _decision(rule)
        return Decision(effect="allow", rule=None, reason=f"no rule governs tool {tool!r}")


def _decision(rule: Rule) -> Decision:
    reason = rule.reason or f"{rule.effect} by rule {rule.name!r}"
    if rule.effect == "require_approval":
        return Decision(effect=rule.effect, rule=rule.name, reason=reason, role=rule.role,
                        quorum=rule.quorum)
    return Decision(effect=rule.effect, rule=rule.name, reason=reason)


def _mismatch(rule: Rule, work_type: str, params: dict[str, Any], source: str,
              tool: str | None) -> str | None:
    """Why ``rule`` does not match (None: it does)."""
    if (rule.tool is None) != (tool is None):
        return "a tool rule (governs a model's tool calls)" if tool is None \
            else "governs submitted work, not tool calls"
    if tool is not None and rule.tool is not None and not fnmatch.fnmatchcase(tool, rule.tool):
        return f"tool {tool!r} does not match {rule.tool!r}"
    if not fnmatch.fnmatchcase(work_type, rule.work_type):
        return f"work type {work_type!r} does not match {rule.work_type!r}"
    if not fnmatch.fnmatchcase(source, rule.source):
        return f"source {source!r} does not match {rule.source!r}"
    if not _contains(params, rule.params):
        what = "input" if tool is not None else "params"
        return f"the {what} do not contain {msgspec.json.encode(rule.params).decode()}"
    return None


def _pattern_covers(wide: str, narrow: str) -> bool:
    """Whether fnmatch pattern ``wide`` matches every name ``narrow`` does (surely so:
    ``*``, the same pattern, or a plain name that ``wide`` matches)."""
    return wide == "*" or wide == narrow or (
        not any(c in narrow for c in "*?[") and fnmatch.fnmatchcase(narrow, wide))


def _covers(earlier: Rule, later: Rule) -> bool:
    """Whether ``earlier`` matches whatever ``later`` would (so ``later`` never decides)."""
    if (earlier.tool is None) != (later.tool is None):
        return False
    if earlier.tool is not None and later.tool is not None \
            and not _pattern_covers(earlier.tool, later.tool):
        return False
    return (_pattern_covers(earlier.work_type, later.work_type)
            and _pattern_covers(earlier.source, later.source)
            and _contains(later.params, earlier.params))
