"""Which tools agents may see: the manifests' pins checked against what servers offer.

A tool is usable only when its server offers it and its live definition hashes
to the pin in the manifest. Anything else is quarantined: hidden from lists,
refused on call, and reported once as a drift so the record shows it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import mcp.types as types

from broker.errors import DownstreamFailed, NotFound, Quarantined
from broker.manifest import SEPARATOR, Manifest, ToolSpec, pin_of


@dataclass(frozen=True, slots=True)
class LiveTool:
    """A pinned tool whose live definition matched its pin at the last check."""

    spec: ToolSpec
    definition: types.Tool  # as agents see it: the exposed name, the rest unchanged


@dataclass(frozen=True, slots=True)
class Drift:
    server: str
    tool: str
    reason: str  # "changed", "unpinned" or "missing"
    live_pin: str | None


class Catalog:
    def __init__(self, manifests: Mapping[str, Manifest]) -> None:
        self._manifests = dict(manifests)
        self._live: dict[str, LiveTool] = {}
        self._quarantined: dict[str, Drift] = {}
        self._refreshed: set[str] = set()
        # Counts the checks: what was derived from the live tools (a shaped
        # listing, say) is stale once it moves on.
        self.generation = 0
        # The name an agent uses for each pinned tool, to the broker's own.
        self._names = {t.exposed_name: t.qualified_name for t in self.pinned}

    @property
    def pinned(self) -> list[ToolSpec]:
        return [t for m in self._manifests.values() for t in m.tools.values()]

    def refresh(self, server: str, unverified: Iterable[types.Tool]) -> list[Drift]:
        """Check a server's offered tools against its pins; return new drifts."""
        manifest = self._manifests[server]
        offered = {tool.name: tool for tool in unverified}
        live: dict[str, LiveTool] = {}
        drifts: list[Drift] = []
        for name, tool in offered.items():
            spec = manifest.tools.get(name)
            live_pin = pin_of(tool.description, tool.input_schema)
            if spec is None:
                drifts.append(Drift(server, name, "unpinned", live_pin))
            elif spec.pin != live_pin:
                drifts.append(Drift(server, name, "changed", live_pin))
            else:
                shown = tool.model_copy(update={"name": spec.exposed_name})
                live[spec.qualified_name] = LiveTool(spec, shown)
        drifts.extend(
            Drift(server, name, "missing", None)
            for name in manifest.tools.keys() - offered.keys()
        )

        prefix = server + SEPARATOR
        self._live = {k: v for k, v in self._live.items() if not k.startswith(prefix)}
        self._live.update(live)
        before = {k for k in self._quarantined if k.startswith(prefix)}
        self._quarantined = {
            k: v for k, v in self._quarantined.items() if not k.startswith(prefix)
        }
        self._quarantined.update({prefix + d.tool: d for d in drifts})
        self._refreshed.add(server)
        self.generation += 1
        return [d for d in drifts if prefix + d.tool not in before]

    def qualified(self, name: str) -> str:
        """The broker's name for the tool an agent calls ``name``, or NotFound."""
        known = self._names.get(name)
        if known is not None:
            return known
        server, sep, _ = name.partition(SEPARATOR)
        manifest = self._manifests.get(server)
        if sep and manifest is not None and manifest.namespaced:
            return name  # not pinned: quarantined or missing, said below
        for manifest in self._manifests.values():
            unpinned = f"{manifest.server}{SEPARATOR}{name}"
            if not manifest.namespaced and unpinned in self._quarantined:
                return unpinned
        raise NotFound(f"no server for tool {name!r}")

    def resolve(self, name: str) -> LiveTool:
        """The usable tool behind an agent's tool name, or the reason there is none."""
        qualified_name = self.qualified(name)
        server = qualified_name.partition(SEPARATOR)[0]
        if server not in self._refreshed:
            raise DownstreamFailed(
                f"server {server} has not been checked against its pins"
            )
        drift = self._quarantined.get(qualified_name)
        if drift is not None and drift.reason != "missing":
            raise Quarantined(f"tool {qualified_name} is quarantined: {drift.reason}")
        tool = self._live.get(qualified_name)
        if tool is None:
            raise NotFound(f"server {server} does not offer {qualified_name!r}")
        return tool

    def usable(self) -> list[LiveTool]:
        return list(self._live.values())

    def input_schema(self, name: str) -> Mapping[str, object] | None:
        tool = self._live.get(self._names.get(name, name))
        return dict(tool.spec.input_schema) if tool is not None else None
