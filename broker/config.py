"""The broker's configuration: one TOML file, secrets only from the environment."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from broker.errors import ConfigError
from broker.limits import Limit, limits_from_config

DEV_ISSUER = "urn:broker:development"
SESSION_MODES = ("stateful", "stateless")
STORE_TYPES = ("sqlite", "redis")


@dataclass(frozen=True, slots=True)
class AuthConfig:
    issuer: str = ""
    jwks_url: str = ""
    algorithms: tuple[str, ...] = ("RS256", "ES256", "PS256", "EdDSA")
    leeway_seconds: int = 30
    required_scopes: tuple[str, ...] = ()
    groups_claim: str = "groups"
    client_claim: str = "azp"
    # How long fetched keys are trusted, and how often an unknown `kid` may
    # cause a refetch: the second bound is what stops a flood of forged
    # tokens from turning into a flood of requests to the identity provider.
    jwks_cache_seconds: int = 3600
    jwks_refetch_cooldown_seconds: int = 30
    jwks_timeout_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class StoreConfig:
    # Where the audit record and pending approvals are kept: "sqlite" (the
    # file at `path`) or "redis" (at `redis_url`, shared by every replica).
    type: str = "sqlite"
    path: str = "broker-state.db"
    # Audit entries older than this many days are pruned at start and by
    # `broker audit prune`; None keeps every entry.
    retention_days: int | None = None
    # Shared state for replicas (call-rate counts, and the audit record and
    # approvals when type is "redis"); empty keeps it in-process.
    # The password comes from the environment variable named here, if any.
    redis_url: str = ""
    redis_password_env: str = ""
    # Longer than this and a limit cannot be checked, so the call is denied.
    # It bounds connecting and each reply alike; an entry that cannot be
    # written within it denies the call too.
    redis_timeout_seconds: float = 0.25
    # Every key the audit record and the approvals use in Redis starts with this.
    redis_key_prefix: str = "broker:"


@dataclass(frozen=True, slots=True)
class ApprovalsConfig:
    """Pending actions and the approvers' page (see ``broker.approvals``)."""

    # How long a call that needs approval waits before answering "pending",
    # and how long a pending action (and then its approval) stays usable.
    wait_seconds: float = 25.0
    expiry_seconds: float = 900.0
    webhook_url: str = ""
    # Where approvers reach this broker; empty means the origin of `resource`.
    public_url: str = ""
    # The page's sign-in; without an issuer, approvers use the API and CLI.
    oidc_issuer: str = ""
    oidc_metadata_url: str = ""
    oidc_client_id: str = ""
    oidc_groups_claim: str = "groups"
    # Names of environment variables that hold secrets (S105: not secrets).
    oidc_client_secret_env: str = "BROKER_OIDC_CLIENT_SECRET"  # noqa: S105
    session_secret_env: str = "BROKER_SESSION_SECRET"  # noqa: S105


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    resource: str
    host: str = "127.0.0.1"
    port: int = 8400
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    policy_dir: Path = Path("cedar_policies")
    manifest_dir: Path = Path("tool_manifests")
    call_timeout_seconds: float = 30.0
    development: bool = False
    dev_key_path: Path = Path(".broker-dev/signing-key.pem")
    # "json" for one redacted JSON object per log line, "text" for a terminal.
    log_format: str = "text"
    # Decide and record, but forward a would-be denial anyway (policy roll-out).
    shadow: bool = False
    # "stateful": agents hold an MCP session with this broker, which lets
    # it relay a server's sampling and elicitation requests to them; behind
    # a load balancer each session must then stay on its replica.
    # "stateless": any replica takes any request, and sampling and
    # elicitation are refused.
    sessions: str = "stateful"
    # Answer plain tools/call requests without the SDK's server machinery,
    # and forward them to HTTP servers on the broker's own connections (see
    # broker.lean); false sends every request through the SDK both ways.
    lean_path: bool = True
    auth: AuthConfig = field(default_factory=AuthConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    approvals: ApprovalsConfig = field(default_factory=ApprovalsConfig)
    limits: tuple[Limit, ...] = ()

    @property
    def metadata_url(self) -> str:
        """RFC 9728 protected resource metadata URL for ``resource``."""
        parts = urlsplit(self.resource)
        path = parts.path.rstrip("/")
        return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{path}"

    @property
    def trusted_issuers(self) -> tuple[str, ...]:
        issuers = [self.auth.issuer] if self.auth.issuer else []
        if self.development:
            issuers.append(DEV_ISSUER)
        return tuple(issuers)


def load_config(path: Path) -> BrokerConfig:
    """Read and check ``path``; every problem is a ConfigError naming the key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    return config_from_dict(raw, base=path.parent)


def config_from_dict(raw: dict[str, Any], base: Path = Path()) -> BrokerConfig:
    broker = _table(raw, "broker")
    auth = _table(raw, "auth")
    store = _table(raw, "store")
    _reject_unknown(
        raw, {"broker", "auth", "store", "approvals", "limits"}, "top level"
    )
    _reject_unknown(
        broker,
        set(BrokerConfig.__dataclass_fields__)
        - {"auth", "store", "approvals", "limits"},
        "[broker]",
    )
    _reject_unknown(auth, set(AuthConfig.__dataclass_fields__), "[auth]")
    _reject_unknown(store, set(StoreConfig.__dataclass_fields__), "[store]")
    if "audience_check" in auth or "verify_audience" in auth:
        raise ConfigError("audience checking cannot be switched off")

    resource = broker.get("resource")
    if not isinstance(resource, str) or not resource.startswith(
        ("https://", "http://")
    ):
        raise ConfigError("[broker] resource must be the broker's canonical https URL")
    parts = urlsplit(resource)
    if parts.fragment:
        raise ConfigError("[broker] resource must not contain a fragment (RFC 8707)")

    auth_fields: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in auth.items()
    }
    try:
        auth_cfg = AuthConfig(**auth_fields)
    except TypeError as exc:
        raise ConfigError(f"bad [auth] table: {exc}") from exc
    development = bool(broker.get("development", False))
    if not development and not (auth_cfg.issuer and auth_cfg.jwks_url):
        raise ConfigError("[auth] issuer and jwks_url are required outside development")
    bad_algs = set(auth_cfg.algorithms) & {"none", "HS256", "HS384", "HS512"}
    if bad_algs:
        raise ConfigError(
            f"[auth] algorithms may not include {sorted(bad_algs)}: "
            "only asymmetric signatures are accepted"
        )

    store_cfg = StoreConfig(**store)
    if store_cfg.type not in STORE_TYPES:
        raise ConfigError(f"[store] type {store_cfg.type!r} is not supported")
    _check_retention(store_cfg.retention_days)
    _check_redis(store_cfg)
    _check_redis_record(store_cfg)

    if broker.get("sessions", "stateful") not in SESSION_MODES:
        raise ConfigError(f"[broker] sessions must be one of {SESSION_MODES}")
    if not isinstance(broker.get("lean_path", True), bool):
        raise ConfigError("[broker] lean_path must be true or false")

    default_host = parts.netloc
    fields: dict[str, Any] = dict(broker)
    fields["allowed_hosts"] = tuple(broker.get("allowed_hosts", [default_host]))
    fields["allowed_origins"] = tuple(broker.get("allowed_origins", []))
    for key in ("policy_dir", "manifest_dir", "dev_key_path"):
        if key in fields:
            fields[key] = base / str(fields[key])
        else:
            fields[key] = base / BrokerConfig.__dataclass_fields__[key].default  # type: ignore[operator]
    if not Path(store_cfg.path).is_absolute():
        store_cfg = dataclasses.replace(store_cfg, path=str(base / store_cfg.path))
    approvals_cfg = _approvals(_table(raw, "approvals"), resource)
    try:
        return BrokerConfig(
            **fields,
            auth=auth_cfg,
            store=store_cfg,
            approvals=approvals_cfg,
            limits=limits_from_config(raw.get("limits", [])),
        )
    except TypeError as exc:
        raise ConfigError(f"bad configuration: {exc}") from exc


def _approvals(table: dict[str, Any], resource: str) -> ApprovalsConfig:
    _reject_unknown(table, set(ApprovalsConfig.__dataclass_fields__), "[approvals]")
    try:
        approvals = ApprovalsConfig(**table)
    except TypeError as exc:
        raise ConfigError(f"bad [approvals] table: {exc}") from exc
    for name in ("wait_seconds", "expiry_seconds"):
        value = getattr(approvals, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"[approvals] {name} must be a number of seconds >= 0")
    if approvals.expiry_seconds <= approvals.wait_seconds:
        raise ConfigError("[approvals] expiry_seconds must exceed wait_seconds")
    parts = urlsplit(resource)
    public = approvals.public_url or f"{parts.scheme}://{parts.netloc}"
    for name, url in (("public_url", public), ("webhook_url", approvals.webhook_url)):
        if url and not url.startswith(("https://", "http://")):
            raise ConfigError(f"[approvals] {name} must be an http(s) URL")
    if approvals.oidc_issuer and not approvals.oidc_client_id:
        raise ConfigError("[approvals] oidc_issuer needs oidc_client_id")
    return dataclasses.replace(approvals, public_url=public.rstrip("/"))


def _check_retention(days: object) -> None:
    if days is None:
        return
    if isinstance(days, bool) or not isinstance(days, int) or days <= 0:
        raise ConfigError("[store] retention_days must be a whole number of days > 0")


def _check_redis(store: StoreConfig) -> None:
    url = store.redis_url
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("[store] redis_url must be a redis(s):// or unix:// URL")
    timeout = store.redis_timeout_seconds
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ConfigError("[store] redis_timeout_seconds must be a number")
    if timeout <= 0:
        raise ConfigError("[store] redis_timeout_seconds must be more than 0")


def _check_redis_record(store: StoreConfig) -> None:
    if store.type == "redis" and not store.redis_url:
        raise ConfigError('[store] type "redis" needs redis_url')
    prefix = store.redis_key_prefix
    if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
        raise ConfigError("[store] redis_key_prefix must be text without spaces")


def redis_password(store: StoreConfig) -> str | None:
    """The password in the variable ``redis_password_env`` names; None if unnamed."""
    if not store.redis_password_env:
        return None
    password = os.environ.get(store.redis_password_env)
    if password is None:
        raise ConfigError(
            f"[store] redis_password_env names {store.redis_password_env}, "
            "which is not set"
        )
    return password


def _table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] must be a table")
    return value


def _reject_unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")
