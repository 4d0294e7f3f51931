"""A denial is decided again with approval only when approval could change it."""

from __future__ import annotations

import shutil

import cedarpy
import pytest

from broker.policy import PolicyEngine, loading
from broker.policy.approval_reads import reads_approval
from tests.test_policy import DELETE_NOTE, SHIPPED
from tests.test_policy_slices import MANY, NOW, PEOPLE, TOOLS

# Beside the shipped rules (one of which forbids destructive tools unless
# approved): a permit that needs approval, forbids that ignore it, and a
# forbid that reads approval only past a limit.
EXTRA = "\n".join(
    [
        *(
            f'permit (principal in Group::"g{n}", '
            f'action == Action::"call:demo.t{n}", resource) '
            f"when {{ context.input.n < {n} }};"
            for n in range(40)
        ),
        'permit (principal, action == Action::"call:demo.t9", resource) '
        "when { context.approval.granted };",
        'forbid (principal, action == Action::"call:demo.t3", resource) '
        'unless { principal in Group::"g3" };',
        'forbid (principal, action == Action::"call:demo.t4", resource) '
        "when { context.input.n > 10 } unless { context.approval.granted };",
        'forbid (principal, action, resource) when { context.scopes.contains("x") };',
    ]
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> PolicyEngine:
    policies = tmp_path_factory.mktemp("policies")
    for path in SHIPPED.glob("*.cedar*"):
        shutil.copy(path, policies)
    (policies / "extra.cedar").write_text(EXTRA, encoding="utf-8")
    return PolicyEngine(loading.load(policies, [*TOOLS, DELETE_NOTE]))


@pytest.mark.parametrize(
    ("condition", "reads"),
    [
        ("when { context.approval.granted }", True),
        ("unless { context.approval.granted }", True),
        ("when { context has approval }", True),
        ('when { context == {"x": 1} }', True),
        ("when { if context.now > 1 then context.approval.granted else false }", True),
        ("when { context.input.amount > 5 }", False),
        ('when { context.data.contains("approval") }', False),
        ("", False),
    ],
)
def test_a_policy_reads_approval_only_through_context(
    condition: str, reads: bool
) -> None:
    """Attribute reads, has-tests and whole-context uses count; a string does not."""
    text = f"permit (principal, action, resource) {condition};"
    tree = cedarpy.PolicySet.from_str(text).to_pst()
    (policy,) = tree.static_policies.values()
    assert reads_approval(policy) is reads


def test_a_denial_marked_final_is_denied_with_approval_too(
    engine: PolicyEngine,
) -> None:
    """Over every caller, tool and value: skipping the second decision loses nothing."""
    final = approvable = turned = 0
    for principal in PEOPLE:
        for tool in MANY:
            for value in (-1, 3, 50):
                denial = engine.decide_tool_call(
                    principal, tool, {"n": value}, data=frozenset(), now=NOW
                )
                if denial.allowed:
                    continue
                again = engine.decide_tool_call(
                    principal,
                    tool,
                    {"n": value},
                    data=frozenset(),
                    approval_granted=True,
                    now=NOW,
                )
                if not denial.approvable:
                    final += 1
                    assert not again.allowed, (principal.subject, tool.name, value)
                else:
                    approvable += 1
                    turned += again.allowed
    # Both kinds occur, and approval really does turn some denials around.
    assert final > 100
    assert approvable > 0
    assert turned > 0


def test_a_destructive_tool_still_waits_for_approval(engine: PolicyEngine) -> None:
    """The shipped forbid-unless-approved keeps its denials approvable."""
    writer = PEOPLE[-1]
    denial = engine.decide_tool_call(
        writer, DELETE_NOTE, {"title": "n1"}, data=frozenset(), now=NOW
    )
    assert not denial.allowed
    assert denial.approvable
