"""Tool manifests: what each downstream server is and what its tools may do.

One JSON file per server in the manifest directory. A manifest says how to
reach the server, which credential the broker presents to it, and the tools
it may offer: each with a pin (a hash of its description and input schema)
and the attributes that policies read (privilege, risk, open world,
destructive). A tool the server offers that is not here, or whose pin no
longer matches, is quarantined.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from broker.errors import ConfigError

SERVER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
PRIVILEGES = ("read", "write", "admin")
RISKS = ("low", "medium", "high")
SEPARATOR = "."
# A stdio session is a process of its own, so fewer of those by default.
DEFAULT_SESSIONS = {"stdio": 2, "http": 8}
MAX_SESSIONS = 256


def pin_of(description: str | None, input_schema: Mapping[str, Any]) -> str:
    """The pin of a tool definition: what the agent's model reads and sends."""
    canonical = json.dumps(
        {"description": description or "", "input_schema": input_schema},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as the operator pinned it."""

    server: str
    name: str
    pin: str
    description: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=dict)
    privilege: str = "read"
    risk: str = "low"
    open_world: bool = False
    destructive: bool = False
    # False when the manifest exposes its server's names as they are.
    namespaced: bool = True

    @property
    def qualified_name(self) -> str:
        """The broker's own name for the tool, in policies and the record."""
        return f"{self.server}{SEPARATOR}{self.name}"

    @property
    def exposed_name(self) -> str:
        """The name agents see: ``server.tool``, or the tool's own name."""
        return self.qualified_name if self.namespaced else self.name


@dataclass(frozen=True, slots=True)
class Transport:
    kind: Literal["stdio", "http"]
    command: str = ""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # Names of the broker's environment variables a stdio server may see;
    # nothing else of the broker's environment is passed on.
    passthrough: tuple[str, ...] = ()
    url: str = ""


@dataclass(frozen=True, slots=True)
class Credential:
    """What the broker presents downstream. Never the agent's token."""

    kind: Literal["none", "env", "client_credentials"]
    # "env": the secret's environment variable, and how it is presented.
    variable: str = ""
    header: str = "Authorization"
    scheme: str = "Bearer"
    # "client_credentials": an OAuth token fetched by the broker itself.
    token_url: str = ""
    client_id: str = ""
    client_secret_variable: str = ""
    audience: str = ""
    scope: str = ""


@dataclass(frozen=True, slots=True)
class Manifest:
    server: str
    transport: Transport
    credential: Credential
    tools: Mapping[str, ToolSpec]
    description: str = ""
    path: Path | None = None
    # Decide and record, but forward a would-be denial anyway: for rolling
    # out new policies against one server before they are enforced.
    shadow: bool = False
    # Whether agents see this server's tools and prompts as ``server.name``
    # (the default) or under their own names, for a broker fronting one
    # server whose clients expect its names unchanged.
    namespaced: bool = True
    # How many sessions the broker may hold with the server for forwarded
    # requests; each carries one request at a time, so that what the server
    # sends back during it (sampling, elicitation, logs, progress) reaches
    # the agent that asked.
    max_sessions: int = 2


def load_manifests(directory: Path) -> dict[str, Manifest]:
    """Every ``*.json`` in ``directory``; a problem is a ConfigError naming the file."""
    if not directory.is_dir():
        raise ConfigError(f"manifest directory {directory} does not exist")
    manifests: dict[str, Manifest] = {}
    for path in sorted(directory.glob("*.json")):
        manifest = load_manifest(path)
        if manifest.server in manifests:
            raise ConfigError(f"{path}: server {manifest.server!r} is declared twice")
        manifests[manifest.server] = manifest
    _check_exposed_names(manifests)
    return manifests


def _check_exposed_names(manifests: Mapping[str, Manifest]) -> None:
    """Two tools agents would see under one name is a configuration error."""
    owners: dict[str, str] = {}
    for manifest in manifests.values():
        for spec in manifest.tools.values():
            other = owners.setdefault(spec.exposed_name, manifest.server)
            if other != manifest.server:
                raise ConfigError(
                    f"tool name {spec.exposed_name!r} is exposed by both "
                    f"{other} and {manifest.server}; keep one of them namespaced"
                )


def load_manifest(path: Path) -> Manifest:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"manifest {path} is not valid JSON: {exc}") from exc
    try:
        return manifest_from_dict(raw, path)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"manifest {path}: {exc}") from exc


def manifest_from_dict(raw: Mapping[str, Any], path: Path | None = None) -> Manifest:
    server = raw["server"]
    if not isinstance(server, str) or not SERVER_NAME.match(server):
        raise ValueError(f"server name {server!r} must match {SERVER_NAME.pattern}")
    tools_raw = raw.get("tools", {})
    if not isinstance(tools_raw, dict):
        raise TypeError("'tools' must be an object keyed by tool name")
    namespaced = raw.get("namespace", True)
    if not isinstance(namespaced, bool):
        raise TypeError("'namespace' must be true or false")
    tools = {
        name: replace(_tool(server, name, spec), namespaced=namespaced)
        for name, spec in tools_raw.items()
    }
    transport = _transport(raw["transport"])
    max_sessions = raw.get("max_sessions", DEFAULT_SESSIONS[transport.kind])
    if not isinstance(max_sessions, int) or not 1 <= max_sessions <= MAX_SESSIONS:
        raise ValueError(
            f"'max_sessions' must be a whole number from 1 to {MAX_SESSIONS}"
        )
    return Manifest(
        server=server,
        transport=transport,
        credential=_credential(raw.get("credential", {"type": "none"})),
        tools=tools,
        description=str(raw.get("description", "")),
        path=path,
        shadow=_bool(raw, "shadow", server),
        namespaced=namespaced,
        max_sessions=max_sessions,
    )


def manifest_to_dict(manifest: Manifest, previous: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest as JSON, keeping what ``previous`` said of everything but tools."""
    out = dict(previous)
    out["server"] = manifest.server
    out["tools"] = {
        spec.name: {
            "pin": spec.pin,
            "privilege": spec.privilege,
            "risk": spec.risk,
            "open_world": spec.open_world,
            "destructive": spec.destructive,
            "description": spec.description,
            "input_schema": dict(spec.input_schema),
        }
        for spec in sorted(manifest.tools.values(), key=lambda t: t.name)
    }
    return out


def _tool(server: str, name: str, spec: Mapping[str, Any]) -> ToolSpec:
    if not isinstance(spec, dict):
        raise TypeError(f"tool {name!r} must be an object")
    pin = spec["pin"]
    if not isinstance(pin, str) or not pin.startswith("sha256:"):
        raise ValueError(f"tool {name!r}: pin must be 'sha256:<hex>'")
    privilege = spec.get("privilege", "read")
    if privilege not in PRIVILEGES:
        raise ValueError(f"tool {name!r}: privilege must be one of {PRIVILEGES}")
    risk = spec.get("risk", "low")
    if risk not in RISKS:
        raise ValueError(f"tool {name!r}: risk must be one of {RISKS}")
    schema = spec.get("input_schema", {})
    if not isinstance(schema, dict):
        raise TypeError(f"tool {name!r}: input_schema must be an object")
    return ToolSpec(
        server=server,
        name=name,
        pin=pin,
        description=str(spec.get("description", "")),
        input_schema=schema,
        privilege=privilege,
        risk=risk,
        open_world=_bool(spec, "open_world", name),
        destructive=_bool(spec, "destructive", name),
    )


def _bool(spec: Mapping[str, Any], key: str, name: str) -> bool:
    value = spec.get(key, False)
    if not isinstance(value, bool):
        raise TypeError(f"tool {name!r}: {key} must be true or false")
    return value


def _transport(raw: Mapping[str, Any]) -> Transport:
    kind = raw["type"]
    if kind == "stdio":
        args = raw.get("args", [])
        env = raw.get("env", {})
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise TypeError("transport.args must be a list of strings")
        passthrough = raw.get("passthrough", [])
        if not isinstance(env, dict):
            raise TypeError("transport.env must be an object")
        if not isinstance(passthrough, list):
            raise TypeError("transport.passthrough must be a list of variable names")
        return Transport(
            kind="stdio",
            command=str(raw["command"]),
            args=tuple(args),
            env={str(k): str(v) for k, v in env.items()},
            passthrough=tuple(str(v) for v in passthrough),
        )
    if kind == "http":
        url = str(raw["url"])
        if not url.startswith(("http://", "https://")):
            raise ValueError("transport.url must be an http(s) URL")
        return Transport(kind="http", url=url)
    raise ValueError(f"transport.type {kind!r} must be 'stdio' or 'http'")


def _credential(raw: Mapping[str, Any]) -> Credential:
    kind = raw.get("type", "none")
    if kind == "none":
        return Credential(kind="none")
    if kind == "env":
        return Credential(
            kind="env",
            variable=str(raw["variable"]),
            header=str(raw.get("header", "Authorization")),
            scheme=str(raw.get("scheme", "Bearer")),
        )
    if kind == "client_credentials":
        return Credential(
            kind="client_credentials",
            token_url=str(raw["token_url"]),
            client_id=str(raw["client_id"]),
            client_secret_variable=str(raw["client_secret_variable"]),
            audience=str(raw["audience"]),
            scope=str(raw.get("scope", "")),
        )
    raise ValueError(
        f"credential.type {kind!r} must be none, env or client_credentials"
    )
