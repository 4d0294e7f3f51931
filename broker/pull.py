"""``broker manifest pull``: pin the tools a server offers now.

The manifest must already say how to reach the server. Tools already pinned
keep the attributes the operator gave them; a new tool gets the most careful
attributes its own annotations allow (the MCP defaults: not read-only,
destructive, open world), so that a tool nobody has looked at yet is treated
as dangerous until someone says otherwise.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import mcp.types as types

from broker.downstream import Downstream
from broker.errors import ConfigError
from broker.manifest import Manifest, ToolSpec, load_manifests, manifest_to_dict, pin_of


async def pull_manifest(manifest_dir: Path, server: str) -> list[str]:
    manifests = load_manifests(manifest_dir)
    manifest = manifests.get(server)
    if manifest is None or manifest.path is None:
        raise ConfigError(
            f"no manifest for server {server!r} in {manifest_dir}; "
            "write one with its transport first"
        )
    downstream = Downstream(manifest, call_timeout=30.0)
    downstream.credentials.check()
    try:
        async with downstream.open_session() as client:
            unverified = (await client.list_tools()).tools
    except Exception as exc:
        raise ConfigError(
            f"cannot list tools of {server}: {type(exc).__name__}: {exc}"
        ) from exc
    tools, changes = merge_tools(manifest, unverified)
    previous = json.loads(manifest.path.read_text(encoding="utf-8"))
    updated = manifest_to_dict(replace(manifest, tools=tools), previous)
    manifest.path.write_text(json.dumps(updated, indent=2) + "\n", encoding="utf-8")
    return changes or [f"{server}: no change"]


def merge_tools(
    manifest: Manifest, unverified: list[types.Tool]
) -> tuple[dict[str, ToolSpec], list[str]]:
    tools: dict[str, ToolSpec] = {}
    changes: list[str] = []
    for tool in unverified:
        pin = pin_of(tool.description, tool.input_schema)
        old = manifest.tools.get(tool.name)
        spec = old or _careful_spec(manifest.server, tool, pin)
        if old is None:
            changes.append(
                f"+ {spec.qualified_name}: pinned, privilege={spec.privilege} "
                f"destructive={spec.destructive} open_world={spec.open_world}"
            )
        elif old.pin != pin:
            changes.append(f"~ {spec.qualified_name}: definition changed, re-pinned")
        tools[tool.name] = replace(
            spec,
            pin=pin,
            description=tool.description or "",
            input_schema=tool.input_schema,
        )
    changes.extend(
        f"- {manifest.server}.{name}: no longer offered, unpinned"
        for name in manifest.tools.keys() - tools.keys()
    )
    return tools, changes


def _careful_spec(server: str, tool: types.Tool, pin: str) -> ToolSpec:
    hints = tool.annotations or types.ToolAnnotations()
    read_only = hints.read_only_hint is True
    return ToolSpec(
        server=server,
        name=tool.name,
        pin=pin,
        privilege="read" if read_only else "write",
        risk="low" if read_only else "high",
        open_world=hints.open_world_hint is not False,
        destructive=not read_only and hints.destructive_hint is not False,
    )
