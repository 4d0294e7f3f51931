"""The Cedar policy engine: loading, deciding, listing, failing closed."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import pytest

from broker.errors import PolicyError
from broker.manifest import ToolSpec, pin_of
from broker.policy import Decision, PolicyEngine
from broker.principal import Principal

SHIPPED = Path(__file__).resolve().parents[1] / "cedar_policies"
NOW = 1_800_000_000.0
NO_DATA: frozenset[str] = frozenset()
STRING = {"type": "string"}
INTEGER = {"type": "integer"}


def make_tool(
    name: str,
    properties: Mapping[str, object],
    required: tuple[str, ...] = (),
    *,
    server: str = "demo",
    privilege: str = "read",
    risk: str = "low",
    open_world: bool = False,
    destructive: bool = False,
) -> ToolSpec:
    schema = {"type": "object", "properties": properties, "required": list(required)}
    return ToolSpec(
        server=server,
        name=name,
        pin=pin_of("", schema),
        input_schema=schema,
        privilege=privilege,
        risk=risk,
        open_world=open_world,
        destructive=destructive,
    )


ECHO = make_tool("echo", {"text": STRING}, ("text",))
ADD = make_tool("add", {"a": INTEGER, "b": INTEGER}, ("a", "b"))
SEARCH = make_tool("search_web", {"query": STRING}, ("query",), open_world=True)
WRITE_NOTE = make_tool(
    "write_note",
    {"title": STRING, "body": STRING},
    ("title", "body"),
    privilege="write",
    risk="medium",
)
DELETE_NOTE = make_tool(
    "delete_note",
    {"title": STRING},
    ("title",),
    privilege="write",
    risk="high",
    destructive=True,
)
TRANSFER = make_tool(
    "transfer",
    {"amount": INTEGER, "to": STRING, "memo": STRING},
    ("amount", "to"),
    privilege="write",
    risk="high",
)
DEMO_TOOLS = (ECHO, ADD, SEARCH, WRITE_NOTE, DELETE_NOTE, TRANSFER)
CALL = frozenset({"tools:call"})
WRITE = frozenset({"tools:call", "tools:write"})


def person(
    subject: str = "alice",
    *,
    scopes: frozenset[str] = CALL,
    groups: frozenset[str] = frozenset(),
) -> Principal:
    return Principal(
        subject=subject,
        issuer="https://idp.example",
        client_id="agent-1",
        scopes=scopes,
        groups=groups,
    )


WRITER = person("wendy", scopes=WRITE, groups=frozenset({"writers"}))
READER = person("rita", scopes=WRITE, groups=frozenset({"readers"}))


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine.load(SHIPPED, DEMO_TOOLS)


def policy_dir(tmp_path: Path, policies: str, name: str = "test.cedar") -> Path:
    """A policy directory with the shipped schema and ``policies`` in one file."""
    shutil.copy(SHIPPED / "broker.cedarschema", tmp_path / "broker.cedarschema")
    (tmp_path / name).write_text(policies, encoding="utf-8")
    return tmp_path


def call(
    engine: PolicyEngine,
    principal: Principal,
    tool: ToolSpec,
    arguments: Mapping[str, object],
    *,
    data: frozenset[str] = NO_DATA,
    approval_granted: bool = False,
) -> Decision:
    return engine.decide_tool_call(
        principal,
        tool,
        arguments,
        data=data,
        approval_granted=approval_granted,
        now=NOW,
    )


PERMIT_ALL = '@id("all") permit (principal, action in Action::"call_tool", resource);\n'


# Listing


def test_reader_sees_only_read_tools(engine: PolicyEngine) -> None:
    """A user outside the writers group is listed the read tools only."""
    names = [t.name for t in engine.visible_tools(READER, DEMO_TOOLS, now=NOW)]
    assert names == ["echo", "add", "search_web"]


def test_writer_sees_write_tools_that_depend_on_arguments(engine: PolicyEngine) -> None:
    """A writer is listed every tool, even those whose answer depends on input."""
    listed = engine.visible_tools(WRITER, DEMO_TOOLS, now=NOW)
    assert listed == list(DEMO_TOOLS)


def test_token_without_call_scope_sees_no_tools(engine: PolicyEngine) -> None:
    """Known context values like scopes still decide when tools are listed."""
    nobody = person(scopes=frozenset({"profile"}), groups=frozenset({"writers"}))
    assert engine.visible_tools(nobody, DEMO_TOOLS, now=NOW) == []


def test_writer_without_write_scope_sees_read_tools(engine: PolicyEngine) -> None:
    """Group membership without the write scope lists read tools only."""
    writer = person(scopes=CALL, groups=frozenset({"writers"}))
    names = [t.name for t in engine.visible_tools(writer, DEMO_TOOLS, now=NOW)]
    assert names == ["echo", "add", "search_web"]


def test_tool_with_another_pin_is_not_listed(engine: PolicyEngine) -> None:
    """A tool whose pin differs from the loaded one is hidden."""
    drifted = make_tool("echo", {"text": STRING, "extra": STRING}, ("text",))
    assert engine.visible_tools(WRITER, [drifted], now=NOW) == []


def test_servers_listed_for_resources_and_prompts(engine: PolicyEngine) -> None:
    """A server's resources and prompts are listed when some read could be allowed."""
    assert engine.visible_servers(READER, ["demo"], "resources", now=NOW) == ["demo"]
    assert engine.visible_servers(READER, ["demo"], "prompts", now=NOW) == ["demo"]


def test_servers_hidden_when_no_policy_permits(tmp_path: Path) -> None:
    """With no permit for resources, no server's resources are listed."""
    engine = PolicyEngine.load(policy_dir(tmp_path, PERMIT_ALL), [ECHO])
    assert engine.visible_servers(READER, ["demo"], "resources", now=NOW) == []


# Tool calls


def test_read_tool_allowed_with_the_permit_as_reason(engine: PolicyEngine) -> None:
    """Any authenticated user calls a read tool; the reason is the policy's @id."""
    decision = call(engine, READER, ECHO, {"text": "hello"})
    assert decision == Decision(True, ("read-tools-for-everyone",), ())


def test_write_tool_denied_outside_writers(engine: PolicyEngine) -> None:
    """A write tool is denied to a user outside the writers group."""
    decision = call(engine, READER, WRITE_NOTE, {"title": "t", "body": "b"})
    assert decision == Decision(False, (), ())


def test_write_tool_allowed_for_writers(engine: PolicyEngine) -> None:
    """A member of the writers group with the write scope may write a note."""
    decision = call(engine, WRITER, WRITE_NOTE, {"title": "t", "body": "b"})
    assert decision.allowed
    assert decision.reasons == ("write-tools-for-writers",)


def test_call_scope_is_required(engine: PolicyEngine) -> None:
    """Without the tools:call scope even a read tool is denied, by the scope check."""
    decision = call(engine, person(scopes=frozenset()), ECHO, {"text": "hi"})
    assert not decision.allowed
    assert decision.reasons == ("tools-need-call-scope",)


def test_write_scope_is_required_for_write_tools(engine: PolicyEngine) -> None:
    """A writer whose token lacks tools:write may not call a write tool."""
    writer = person(scopes=CALL, groups=frozenset({"writers"}))
    decision = call(engine, writer, WRITE_NOTE, {"title": "t", "body": "b"})
    assert decision.reasons == ("write-tools-need-write-scope",)
    assert not decision.allowed


@pytest.mark.parametrize(
    ("amount", "allowed"),
    [(100_000, True), (100_001, False), (-5, True)],
)
def test_transfer_limit(engine: PolicyEngine, amount: int, allowed: bool) -> None:
    """A transfer of up to 1,000.00 (100000 cents) goes ahead; a cent more does not."""
    decision = call(engine, WRITER, TRANSFER, {"amount": amount, "to": "bob"})
    assert decision.allowed is allowed
    assert ("transfer-limit" in decision.reasons) is not allowed


def test_optional_argument_may_be_given(engine: PolicyEngine) -> None:
    """An optional argument of the right type is accepted."""
    arguments = {"amount": 5, "to": "bob", "memo": "rent"}
    assert call(engine, WRITER, TRANSFER, arguments).allowed


def test_card_number_to_open_world_tool_denied(engine: PolicyEngine) -> None:
    """A card number found in the arguments never reaches an open-world tool."""
    card = frozenset({"card_number"})
    decision = call(engine, READER, SEARCH, {"query": "4111..."}, data=card)
    assert not decision.allowed
    assert decision.reasons == ("no-secrets-to-open-world",)


def test_card_number_to_closed_tool_allowed(engine: PolicyEngine) -> None:
    """The same data class may go to a tool that does not reach the open world."""
    card = frozenset({"card_number"})
    assert call(engine, READER, ECHO, {"text": "4111..."}, data=card).allowed


def test_destructive_tool_needs_approval(engine: PolicyEngine) -> None:
    """A destructive tool is denied until approval is granted."""
    denied = call(engine, WRITER, DELETE_NOTE, {"title": "t"})
    approved = call(engine, WRITER, DELETE_NOTE, {"title": "t"}, approval_granted=True)
    assert denied.reasons == ("destructive-needs-approval",)
    assert not denied.allowed
    assert approved.allowed


# Arguments that do not fit


@pytest.mark.parametrize(
    "arguments",
    [
        {"amount": "100", "to": "bob"},
        {"amount": True, "to": "bob"},
        {"amount": 1.5, "to": "bob"},
        {"amount": 2**64, "to": "bob"},
        {"amount": 5, "to": ["bob"]},
        {"amount": 5, "to": "bob", "extra": 1},
        {"amount": {"__extn": {"fn": "decimal", "arg": "1.0"}}, "to": "bob"},
    ],
)
def test_argument_of_wrong_type_denies(
    engine: PolicyEngine, arguments: Mapping[str, object]
) -> None:
    """An argument that does not fit the tool's schema is a denial with an error."""
    decision = call(engine, WRITER, TRANSFER, arguments)
    assert not decision.allowed
    assert decision.errors


def test_missing_required_argument_denied_by_cedar(engine: PolicyEngine) -> None:
    """Cedar's request validation refuses a call lacking a required argument."""
    decision = call(engine, WRITER, TRANSFER, {"amount": 5})
    assert not decision.allowed
    assert "`to`" in decision.errors[0]


def test_tool_not_in_the_policy_set_denied(engine: PolicyEngine) -> None:
    """A tool that was not pinned when the engine loaded is denied."""
    other = make_tool("echo", {"text": STRING}, ("text",), server="other")
    decision = call(engine, WRITER, other, {"text": "hi"})
    assert not decision.allowed
    assert "not pinned" in decision.errors[0]


def test_number_arguments_are_decimals(tmp_path: Path) -> None:
    """A JSON number becomes a Cedar decimal that policies compare with decimals."""
    price = make_tool("buy", {"price": {"type": "number"}}, ("price",))
    engine = PolicyEngine.load(
        policy_dir(
            tmp_path,
            PERMIT_ALL + '@id("dear") forbid (principal, action == '
            'Action::"call:demo.buy", resource) '
            'when { context.input.price.greaterThan(decimal("10.5")) };',
        ),
        [price],
    )
    assert call(engine, READER, price, {"price": 10.5}).allowed
    assert call(engine, READER, price, {"price": 3}).allowed
    assert call(engine, READER, price, {"price": 10.51}).reasons == ("dear",)


@pytest.mark.parametrize("price", [0.00001, 1e20, float("nan")])
def test_number_cedar_cannot_hold_denies(tmp_path: Path, price: float) -> None:
    """A number outside Cedar's decimal leaves the call undecided, a denial."""
    tool = make_tool("buy", {"price": {"type": "number"}}, ("price",))
    engine = PolicyEngine.load(policy_dir(tmp_path, PERMIT_ALL), [tool])
    decision = call(engine, READER, tool, {"price": price})
    assert not decision.allowed
    assert decision.errors


def test_unsupported_shapes_are_left_out(tmp_path: Path) -> None:
    """Arguments without a Cedar type are dropped; the rest stay visible to policy."""
    tool = make_tool(
        "odd",
        {
            "either": {"anyOf": [STRING, INTEGER]},
            "rows": {"type": "array", "items": {"type": "object", "properties": {}}},
            "tags": {"type": "array", "items": STRING},
            "trace id": STRING,
            "where": {"type": "object", "properties": {"city": STRING}},
        },
        ("either",),
    )
    policies = PERMIT_ALL + (
        '@id("tagged") forbid (principal, action == Action::"call:demo.odd", '
        'resource) when { context.input has tags && context.input.tags.contains("x")'
        ' && context.input has "trace id" && context.input has where };'
    )
    engine = PolicyEngine.load(policy_dir(tmp_path, policies), [tool])
    arguments = {
        "either": 3,
        "rows": [{"a": 1}],
        "tags": ["x"],
        "trace id": "t-1",
        "where": {"city": "Oslo"},
    }
    assert call(engine, READER, tool, arguments).reasons == ("tagged",)


def test_names_that_are_not_identifiers_are_quoted(tmp_path: Path) -> None:
    """Tool and argument names with quotes, spaces or newlines load and decide."""
    tool = make_tool('say "it\'s"\nnow', {"in": STRING, 'a"b c': INTEGER}, ("in",))
    engine = PolicyEngine.load(policy_dir(tmp_path, PERMIT_ALL), [tool])
    assert engine.visible_tools(READER, [tool], now=NOW) == [tool]
    assert call(engine, READER, tool, {"in": "x", 'a"b c': 1}).allowed


# Failing closed


OVERFLOW = (
    PERMIT_ALL + '@id("overflows") forbid (principal, action == '
    'Action::"call:demo.add", resource) '
    "when { context.input.a * 1000000000000 > 5 };\n"
)


def test_forbid_that_errors_at_evaluation_denies(tmp_path: Path) -> None:
    """A forbid that fails while evaluated (Cedar skips it) still denies."""
    engine = PolicyEngine.load(policy_dir(tmp_path, OVERFLOW), [ADD])
    decision = call(engine, READER, ADD, {"a": 10**9, "b": 0})
    assert not decision.allowed
    assert decision.reasons == ("all",)
    assert "policy `overflows`" in decision.errors[0]
    assert "overflow" in decision.errors[0]


def test_forbid_that_evaluates_cleanly_still_applies(tmp_path: Path) -> None:
    """The same forbid, without overflow, decides as written."""
    engine = PolicyEngine.load(policy_dir(tmp_path, OVERFLOW), [ADD])
    assert call(engine, READER, ADD, {"a": 0, "b": 0}).allowed
    assert call(engine, READER, ADD, {"a": 1, "b": 0}).reasons == ("overflows",)


def test_no_permit_lists_nothing_and_allows_nothing(tmp_path: Path) -> None:
    """No policy at all means no tool is listed and every call is denied."""
    engine = PolicyEngine.load(policy_dir(tmp_path, "// nothing\n"), [ECHO])
    assert engine.visible_tools(READER, [ECHO], now=NOW) == []
    assert not call(engine, READER, ECHO, {"text": "hi"}).allowed


def test_undecidable_time_denies_instead_of_raising(engine: PolicyEngine) -> None:
    """A decide method turns any exception into a denial carrying its text."""
    decision = engine.decide_resource_read(READER, "demo", "note://1", now=float("inf"))
    assert not decision.allowed
    assert decision.errors[0].startswith("OverflowError")


def test_undecidable_time_lists_nothing(engine: PolicyEngine) -> None:
    """Listing with a clock that is not a number shows nothing instead of raising."""
    assert engine.visible_tools(WRITER, DEMO_TOOLS, now=float("nan")) == []
    listed = engine.visible_servers(WRITER, ["demo"], "prompts", now=float("inf"))
    assert listed == []


# Resources, prompts, requests from servers


def test_resource_read_and_prompt_get_allowed(engine: PolicyEngine) -> None:
    """Authenticated users read resources and get prompts under the shipped policy."""
    read = engine.decide_resource_read(READER, "demo", "note://1", now=NOW)
    got = engine.decide_prompt_get(READER, "demo", "greet", data=NO_DATA, now=NOW)
    assert read.allowed
    assert got.reasons == ("resources-and-prompts-for-everyone",)


@pytest.mark.parametrize("kind", ["sample", "elicit"])
def test_only_demo_may_sample_and_elicit(
    engine: PolicyEngine, kind: Literal["sample", "elicit"]
) -> None:
    """The demo server may sample and elicit; any other server may not."""
    demo = engine.decide_server_request("demo", READER, kind, now=NOW)
    other = engine.decide_server_request("other", READER, kind, now=NOW)
    assert demo.allowed
    assert not other.allowed


# Loading


def test_shipped_policies_load_with_the_demo_directory(engine: PolicyEngine) -> None:
    """With demo tools pinned, the demo directory's policy is loaded too."""
    assert engine.policy_count == 14


def test_shipped_policies_load_without_demo_tools() -> None:
    """Without demo tools the demo directory is not read and the rest still loads."""
    tool = make_tool("now", {}, server="clock")
    engine = PolicyEngine.load(SHIPPED, [tool])
    assert engine.policy_count == 12
    assert call(engine, READER, tool, {}).allowed


def test_misspelled_attribute_names_the_policy(tmp_path: Path) -> None:
    """A policy that does not validate stops the load, named by file and @id."""
    bad = (
        '@id("typo") permit (principal, action in Action::"call_tool", resource) '
        'when { resource.privilage == "read" };'
    )
    with pytest.raises(PolicyError, match=r"test\.cedar.*@id\('typo'\).*privilage"):
        PolicyEngine.load(policy_dir(tmp_path, bad), [ECHO])


def test_policy_without_id_is_named_by_position(tmp_path: Path) -> None:
    """A failing policy without @id is named by Cedar's positional id."""
    bad = PERMIT_ALL + 'forbid (principal, action == Action::"nope", resource);'
    with pytest.raises(PolicyError, match=r"policy policy1 \(no @id\)"):
        PolicyEngine.load(policy_dir(tmp_path, bad), [ECHO])


def test_syntax_error_names_the_file(tmp_path: Path) -> None:
    """A policy file that does not parse stops the load, naming the file."""
    directory = policy_dir(tmp_path, "permit (principal, action resource);", "x.cedar")
    with pytest.raises(PolicyError, match=r"x\.cedar"):
        PolicyEngine.load(directory, [ECHO])


def test_duplicate_id_is_refused(tmp_path: Path) -> None:
    """Two policies may not share an @id: reasons would be ambiguous."""
    directory = policy_dir(tmp_path, PERMIT_ALL)
    (directory / "again.cedar").write_text(PERMIT_ALL, encoding="utf-8")
    with pytest.raises(PolicyError, match=r"@id\('all'\) is also used"):
        PolicyEngine.load(directory, [ECHO])


def test_missing_schema_is_refused(tmp_path: Path) -> None:
    """A policy directory without the base schema stops the load."""
    (tmp_path / "p.cedar").write_text(PERMIT_ALL, encoding="utf-8")
    with pytest.raises(PolicyError, match=r"broker\.cedarschema"):
        PolicyEngine.load(tmp_path, [ECHO])


def test_server_directory_must_match_its_tools(tmp_path: Path) -> None:
    """A server's own policies naming a tool it no longer pins stop the load."""
    directory = policy_dir(tmp_path, PERMIT_ALL)
    shutil.copytree(SHIPPED / "demo", directory / "demo")
    with pytest.raises(PolicyError, match=r"transfer\.cedar.*transfer-limit"):
        PolicyEngine.load(directory, [ECHO])


def test_failed_reload_raises_and_old_engine_keeps_deciding(tmp_path: Path) -> None:
    """reload raises PolicyError on a broken set; the engine in hand is unchanged."""
    directory = policy_dir(tmp_path, PERMIT_ALL)
    engine = PolicyEngine.load(directory, [ECHO])
    (directory / "test.cedar").write_text("permit (", encoding="utf-8")
    with pytest.raises(PolicyError):
        engine.reload(directory, [ECHO])
    assert call(engine, READER, ECHO, {"text": "hi"}).allowed


def test_reload_returns_a_new_engine(tmp_path: Path) -> None:
    """A successful reload decides with the new policies."""
    directory = policy_dir(tmp_path, PERMIT_ALL)
    engine = PolicyEngine.load(directory, [ECHO])
    (directory / "test.cedar").write_text("// none\n", encoding="utf-8")
    fresh = engine.reload(directory, [ECHO])
    assert not call(fresh, READER, ECHO, {"text": "hi"}).allowed
    assert call(engine, READER, ECHO, {"text": "hi"}).allowed
