"""``animus rules list|check|test``: the rules without SQL or guesswork, and the rule that
can never match named (the first matching rule decides, across files in name order)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from animus_core.governance.rules import RuleSet
from tests.engine_helpers import run_cli

RULES_A = """
[[rule]]
name = "prod deploys need two"
work_type = "deploy"
params = { env = "prod" }
effect = "require_approval"
quorum = 2
reason = "two people look at every production deploy"

[[rule]]
name = "payments need a person"
tool = "pay_*"
effect = "require_approval"
"""

RULES_B = """
[[rule]]
name = "deploys"
work_type = "deploy"
effect = "allow"

[[rule]]
name = "prod deploys denied"
work_type = "deploy"
params = { env = "prod", region = "eu" }
effect = "deny"
reason = "never reached"

[[rule]]
name = "reports from cron"
work_type = "report*"
source = "cron"
effect = "allow"
"""


def rules_env(cli_env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "a.toml").write_text(RULES_A)
    (rules / "b.toml").write_text(RULES_B)
    return {**cli_env, "ANIMUS_RULES": str(rules)}, rules


def test_a_rule_is_shadowed_only_by_an_earlier_one_that_matches_all_it_would(tmp_path):
    _, rules = rules_env({}, tmp_path)
    ruleset = RuleSet.load(rules)
    assert [(r.name, e.name) for _, r, _, e in ruleset.shadowed()] == [
        ("prod deploys denied", "prod deploys need two")]
    # a narrower earlier rule, a pattern, another source: none shadows
    (rules / "c.toml").write_text(
        "[[rule]]\nname = 'eu reports'\nwork_type = 'report-eu'\neffect = 'allow'\n"
        "[[rule]]\nname = 'any report'\nwork_type = 'report*'\neffect = 'deny'\n"
        "reason = 'no'\n")
    names = [(r.name, e.name) for _, r, _, e in RuleSet.load(rules).shadowed()]
    assert ("any report", "eu reports") not in names
    assert ("eu reports", "reports from cron") not in names


async def test_rules_list_check_and_test(cli_env, tmp_path):
    env, rules = rules_env(cli_env, tmp_path)
    code, out, err = await run_cli(env, tmp_path, "rules", "list")
    assert code == 0, err
    names = [line.split("  ")[2] for line in out.splitlines()[1:6]]
    assert [re.sub(r" +", " ", n).strip() for n in names] == [
        "prod deploys need two", "payments need a person", "deploys",
        "prod deploys denied (never matches)", "reports from cron"]
    assert "the first rule that matches decides, across files in name order" in out
    code, out, err = await run_cli(env, tmp_path, "rules", "list", "--json")
    listed = json.loads(out)
    assert [(r["file"].endswith(f), r["name"], r["never_matches"]) for r, f in zip(
        listed, ["a.toml", "a.toml", "b.toml", "b.toml", "b.toml"], strict=True)] == [
        (True, "prod deploys need two", None), (True, "payments need a person", None),
        (True, "deploys", None), (True, "prod deploys denied", "prod deploys need two"),
        (True, "reports from cron", None)]

    code, out, err = await run_cli(env, tmp_path, "rules", "check")
    assert code == 1, out + err
    assert out.splitlines()[0] == "5 rules in 2 files: they load"
    assert (f"warning: {rules / 'b.toml'}: rule 'prod deploys denied' can never match: rule "
            f"'prod deploys need two' ({rules / 'a.toml'}) comes first") in out

    code, out, err = await run_cli(env, tmp_path, "rules", "test", "deploy", "-p", "env=prod")
    assert code == 0, err
    assert out.splitlines() == [
        "'deploy' from 'cli': require_approval (2 x approver): two people look at every "
        "production deploy",
        "  a.toml: 'prod deploys need two': decides"]
    code, out, err = await run_cli(env, tmp_path, "rules", "test", "report-daily",
                                   "--source", "web", "--json")
    data = json.loads(out)
    assert data["decision"]["effect"] == "deny"
    assert [(r["rule"], r["why_not"]) for r in data["rules"]] == [
        ("prod deploys need two", "work type 'report-daily' does not match 'deploy'"),
        ("payments need a person", "a tool rule (governs a model's tool calls)"),
        ("deploys", "work type 'report-daily' does not match 'deploy'"),
        ("prod deploys denied", "work type 'report-daily' does not match 'deploy'"),
        ("reports from cron", "source 'web' does not match 'cron'")]
    code, out, err = await run_cli(env, tmp_path, "rules", "test", "report-daily",
                                   "--source", "web")
    assert "  no rule matches (work: denied, rules fail closed; tools: allowed)" in out
    code, out, err = await run_cli(env, tmp_path, "rules", "test", "anything", "--tool",
                                   "pay_invoice", "-p", "amount=3")
    assert out.splitlines()[0] == ("a call of tool 'pay_invoice' in 'anything': "
                                   "require_approval (1 x approver): require_approval by rule "
                                   "'payments need a person'")

    (rules / "c.toml").write_text("[[rule]]\nname = 'x'\neffect = 'maybe'\n")
    code, out, err = await run_cli(env, tmp_path, "rules", "check")
    assert code == 2
    assert str(rules / "c.toml") in err
