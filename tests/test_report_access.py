"""Who may read the denied-call report: a Cedar decision, failing closed."""

from __future__ import annotations

import shutil
from pathlib import Path

from broker.manifest import ToolSpec, pin_of
from broker.policy import PolicyEngine
from broker.principal import Principal

SHIPPED = Path(__file__).resolve().parents[1] / "cedar_policies"
NOW = 1_800_000_000.0
# One pinned tool, so that the shipped tool policies have actions to apply to.
CLOCK = ToolSpec(server="clock", name="now", pin=pin_of("", {}))


def reader(*groups: str) -> Principal:
    return Principal(
        subject="sam",
        issuer="https://idp.example",
        client_id="browser",
        groups=frozenset(groups),
    )


def test_members_of_security_may_read_the_report() -> None:
    """The shipped policy admits Group::"security" and names itself as the reason."""
    engine = PolicyEngine.load(SHIPPED, [CLOCK])

    decision = engine.decide_report_read(reader("security"), "denied", now=NOW)

    assert decision.allowed
    assert decision.reasons == ("security-reads-reports",)


def test_everyone_else_is_refused_by_default() -> None:
    """Writers, approvers and users without groups get no permit."""
    engine = PolicyEngine.load(SHIPPED, [CLOCK])

    for groups in [(), ("writers",), ("approvers", "eng"), ("Security",)]:
        decision = engine.decide_report_read(reader(*groups), "denied", now=NOW)
        assert not decision.allowed, groups


def test_a_policy_set_without_the_action_refuses(tmp_path: Path) -> None:
    """A schema that lacks read_report turns the decision into a denial, not a crash."""
    schema = (SHIPPED / "broker.cedarschema").read_text(encoding="utf-8")
    cut = schema.split("// A report the broker serves")[0]
    (tmp_path / "broker.cedarschema").write_text(cut, encoding="utf-8")
    shutil.copy(SHIPPED / "servers.cedar", tmp_path / "servers.cedar")
    engine = PolicyEngine.load(tmp_path, [CLOCK])

    decision = engine.decide_report_read(reader("security"), "denied", now=NOW)

    assert not decision.allowed
    assert decision.errors
