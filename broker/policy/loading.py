"""Reading a policy directory into parsed, validated Cedar handles.

The directory holds ``broker.cedarschema``, the policy files ``*.cedar`` that
always apply, and one subdirectory per server (``demo/*.cedar``) for rules
that name that server's own tool actions. A server's subdirectory is read only
when the server has pinned tools: its policies name actions that exist only
then, and Cedar's validator refuses a policy naming an unknown action.

Anything wrong is a PolicyError naming the file and, for a policy, its ``@id``
(or Cedar's positional id) beside Cedar's own message.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cedarpy

from broker.errors import PolicyError
from broker.manifest import ToolSpec
from broker.policy.schema import Record, input_record, tool_action

SCHEMA_FILE = "broker.cedarschema"


@dataclass(frozen=True, slots=True)
class Loaded:
    """Everything an engine decides with, parsed once."""

    policies: cedarpy.PolicySet
    schema: cedarpy.Schema
    entities: cedarpy.Entities
    tools: Mapping[str, ToolSpec]
    inputs: Mapping[str, Record]
    labels: Mapping[str, str]


def load(policy_dir: Path, tools: Iterable[ToolSpec]) -> Loaded:
    """Parse and validate the schema, the policies and the tool entities."""
    pinned = _by_name(tools)
    inputs = {name: input_record(t.input_schema) for name, t in pinned.items()}
    schema = _schema(policy_dir / SCHEMA_FILE, pinned, inputs)
    servers = {tool.server for tool in pinned.values()}
    policies = _policies(policy_files(policy_dir, servers), schema)
    return Loaded(
        policies=policies,
        schema=schema,
        entities=_tool_entities(pinned.values(), schema),
        tools=pinned,
        inputs=inputs,
        labels=_labels(policies),
    )


def policy_files(policy_dir: Path, servers: Iterable[str]) -> list[Path]:
    """The policy files that apply when ``servers`` have pinned tools, in order."""
    if not policy_dir.is_dir():
        raise PolicyError(f"policy directory {policy_dir} does not exist")
    paths = sorted(policy_dir.glob("*.cedar"))
    for server in sorted(servers):
        paths += sorted((policy_dir / server).glob("*.cedar"))
    return paths


def _by_name(tools: Iterable[ToolSpec]) -> dict[str, ToolSpec]:
    pinned: dict[str, ToolSpec] = {}
    for tool in tools:
        if tool.qualified_name in pinned:
            raise PolicyError(f"tool {tool.qualified_name!r} is pinned twice")
        pinned[tool.qualified_name] = tool
    return pinned


def _schema(
    path: Path, tools: Mapping[str, ToolSpec], inputs: Mapping[str, Record]
) -> cedarpy.Schema:
    actions = (tool_action(tool, inputs[name]) for name, tool in tools.items())
    text = _read(path) + "\n" + "\n".join(actions)
    try:
        return cedarpy.Schema.from_str(text)
    except ValueError as exc:
        raise PolicyError(
            f"{path} with {len(tools)} generated tool actions: {exc}"
        ) from exc


def _policies(paths: Sequence[Path], schema: cedarpy.Schema) -> cedarpy.PolicySet:
    combined = cedarpy.PolicySet.from_str("")
    owners: dict[str, Path] = {}
    for path in paths:
        text = _read(path)
        _check_ids(path, _parse(path, text), owners)
        _validate(path, text, schema)
        # Positional ids are renumbered to follow the set, as concatenation would.
        combined = combined.with_added_str(text)
    return combined


def _parse(path: Path, text: str) -> cedarpy.PolicySet:
    try:
        parsed = cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        raise PolicyError(f"{path}: {exc}") from exc
    if parsed.templates():
        # An unlinked template decides nothing; one here is a mistake.
        raise PolicyError(f"{path}: templates (?principal, ?resource) are not used")
    return parsed


def _check_ids(path: Path, parsed: cedarpy.PolicySet, owners: dict[str, Path]) -> None:
    for policy in parsed.to_pst().static_policies.values():
        label = policy.annotations.get("id")
        if not label:
            continue
        if label in owners:
            raise PolicyError(f"{path}: @id({label!r}) is also used in {owners[label]}")
        owners[label] = path


def _validate(path: Path, text: str, schema: cedarpy.Schema) -> None:
    result = cedarpy.validate_policies(text, schema)
    if result.validation_passed:
        return
    names = result.id_annotations_by_policy_id
    problems = (
        f"{_describe(error.policy_id, names.get(error.policy_id))}: {error.error}"
        for error in result.errors
    )
    raise PolicyError(f"{path}: " + "; ".join(problems))


def _describe(policy_id: str, annotation: str | None) -> str:
    if annotation:
        return f"policy @id({annotation!r}) ({policy_id})"
    return f"policy {policy_id or '?'} (no @id)"


def _labels(policies: cedarpy.PolicySet) -> dict[str, str]:
    statics = policies.to_pst().static_policies
    return {pid: p.annotations.get("id") or pid for pid, p in statics.items()}


def _tool_entities(
    tools: Collection[ToolSpec], schema: cedarpy.Schema
) -> cedarpy.Entities:
    rows: list[dict[str, object]] = []
    for server in sorted({tool.server for tool in tools}):
        rows.append(
            {"uid": {"type": "Server", "id": server}, "attrs": {}, "parents": []}
        )
    for tool in tools:
        rows.append(_tool_row(tool))
    try:
        # Built with the schema, the set also holds the action hierarchy
        # (each tool's action in call_tool) that `action in` relies on.
        return cedarpy.Entities.from_json_str(json.dumps(rows), schema)
    except ValueError as exc:
        raise PolicyError(f"tool entities do not fit the schema: {exc}") from exc


def _tool_row(tool: ToolSpec) -> dict[str, object]:
    return {
        "uid": {"type": "Tool", "id": tool.qualified_name},
        "attrs": {
            "name": tool.name,
            "server": tool.server,
            "privilege": tool.privilege,
            "risk": tool.risk,
            "open_world": tool.open_world,
            "destructive": tool.destructive,
        },
        "parents": [{"type": "Server", "id": tool.server}],
    }


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read {path}: {exc}") from exc
