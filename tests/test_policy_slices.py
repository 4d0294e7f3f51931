"""Policies cut per action decide exactly as the whole set does."""

from __future__ import annotations

import shutil
from pathlib import Path

import cedarpy
import pytest

from broker.manifest import ToolSpec
from broker.policy import PolicyEngine, loading
from broker.policy.slices import BUCKET, Slices
from broker.principal import Principal
from tests.test_policy import ADD, ECHO, SHIPPED, WRITE_NOTE, make_tool

NOW = 1_800_000_000.0
MANY = [make_tool(f"t{n}", {"n": {"type": "integer"}}, ("n",)) for n in range(40)]
TOOLS: list[ToolSpec] = [ECHO, ADD, WRITE_NOTE, *MANY]
# Per-tool rules in every form a scope can take, and rules for every tool.
EXTRA = "\n".join(
    [
        *(
            f'permit (principal in Group::"g{n}", '
            f'action == Action::"call:demo.t{n}", resource) '
            f"when {{ context.input.n < {n} }};"
            for n in range(40)
        ),
        'permit (principal, action in [Action::"call:demo.t1", '
        'Action::"call:demo.t2"], resource);',
        'forbid (principal, action == Action::"call:demo.t3", resource) '
        'unless { principal in Group::"g3" };',
        'forbid (principal, action, resource) when { context.scopes.contains("x") };',
    ]
)
PEOPLE = [
    Principal("alice", "https://idp", "agent", frozenset({"tools:call"})),
    Principal("gail", "https://idp", "agent", frozenset({"tools:call"}), frozenset()),
    Principal(
        "g3", "https://idp", "agent", frozenset({"tools:call"}), frozenset({"g3"})
    ),
    Principal(
        "g7", "https://idp", "agent", frozenset({"tools:call", "x"}), frozenset({"g7"})
    ),
    Principal(
        "w",
        "https://idp",
        "agent",
        frozenset({"tools:call", "tools:write"}),
        frozenset({"writers", "g20"}),
    ),
]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> loading.Loaded:
    policies = tmp_path_factory.mktemp("policies")
    for path in SHIPPED.glob("*.cedar*"):
        shutil.copy(path, policies)
    (policies / "many.cedar").write_text(EXTRA, encoding="utf-8")
    return loading.load(policies, TOOLS)


def test_a_slice_leaves_out_other_tools_rules(loaded: loading.Loaded) -> None:
    slices = Slices(loaded.policies, loaded.entities)
    whole = len(loaded.policies)
    one = len(slices.for_action("call:demo.t5"))
    assert one < whole - 35
    # Rules for every tool (`action in call_tool`, unconstrained) stay.
    assert len(slices.for_action("call:demo.t1")) == one + 1


def test_tools_share_slices_in_buckets(loaded: loading.Loaded) -> None:
    actions = [f"call:{t.qualified_name}" for t in TOOLS]
    slices = Slices(loaded.policies, loaded.entities, actions)
    ordered = sorted(actions)
    first, last = ordered[0], ordered[-1]
    assert slices.for_action(first) is slices.for_action(ordered[BUCKET - 1])
    assert slices.for_action(first) is not slices.for_action(last)
    assert len(slices.for_action(last)) < len(loaded.policies)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 7, 20, 39])
def test_every_tool_call_is_decided_as_by_the_whole_set(
    loaded: loading.Loaded, n: int
) -> None:
    engine = PolicyEngine(loaded)
    tool = MANY[n]
    for principal in PEOPLE:
        for value in (-1, 3, 50):
            sliced = engine.decide_tool_call(
                principal, tool, {"n": value}, data=frozenset(), now=NOW
            )
            whole = _whole_set_decides(loaded, principal, tool, value)
            assert sliced.allowed == whole, (principal.subject, tool.name, value)


def test_listing_agrees_with_the_whole_set(loaded: loading.Loaded) -> None:
    engine = PolicyEngine(loaded)
    for principal in PEOPLE:
        shown = {t.name for t in engine.visible_tools(principal, TOOLS, now=NOW)}
        could = {
            t.name
            for t in MANY
            if any(_whole_set_decides(loaded, principal, t, v) for v in range(-1, 41))
        }
        assert shown & {t.name for t in MANY} == could, principal.subject


def _whole_set_decides(
    loaded: loading.Loaded, principal: Principal, tool: ToolSpec, value: int
) -> bool:
    """The same request, decided by cedarpy with every policy and the schema."""
    groups = [{"type": "Group", "id": g} for g in sorted(principal.groups)]
    user = {"uid": {"type": "User", "id": principal.subject}, "attrs": {}}
    entities = loaded.entities.with_added_json_str(
        cedarpy.json.dumps([{**user, "parents": groups}])
    )
    request = {
        "principal": {"type": "User", "id": principal.subject},
        "action": {"type": "Action", "id": f"call:{tool.qualified_name}"},
        "resource": {"type": "Tool", "id": tool.qualified_name},
        "context": {
            "client": principal.client_id,
            "scopes": sorted(principal.scopes),
            "now": int(NOW),
            "data": [],
            "approval": {"granted": False, "approvers": []},
            "input": {"n": value},
        },
    }
    result = cedarpy.is_authorized(request, loaded.policies, entities, loaded.schema)
    return result.decision == cedarpy.Decision.Allow and not result.diagnostics.errors


def test_unknown_scope_forms_are_kept(tmp_path: Path) -> None:
    """A set with templates is never cut."""
    policies = cedarpy.PolicySet.from_str(
        'permit (principal == ?principal, action == Action::"a", resource);\n'
        'permit (principal, action == Action::"b", resource);'
    )
    entities = cedarpy.Entities.from_json_str("[]")
    slices = Slices(policies, entities)
    assert slices.for_action("a") is policies
