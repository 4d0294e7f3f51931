"""The ``broker`` command: serve, check, pin manifests, mint development tokens."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from broker import record_cli
from broker.approvals import cli as approvals_cli
from broker.config import BrokerConfig, load_config
from broker.errors import ConfigError
from broker.observability import configure_logging

DEFAULT_CONFIG = Path("broker.toml")

BANNER = """\
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!!  DEVELOPMENT MODE: this broker trusts tokens signed with the local      !!
!!  development key {key:<54}!!
!!  Anyone who can read that file can act as any user. Never expose this. !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging("text")
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(f"broker: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description=__doc__)
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help="configuration file (default: ./broker.toml)",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the broker")
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate config, manifests and policies")
    check.set_defaults(run=_check)

    manifest = commands.add_parser("manifest", help="manage tool manifests")
    pull = manifest.add_subparsers(required=True, metavar="ACTION").add_parser(
        "pull", help="connect to a server and pin the tools it offers now"
    )
    pull.add_argument(
        "server", help="server name (its manifest must give the transport)"
    )
    pull.set_defaults(run=_manifest_pull)

    token = commands.add_parser(
        "token", help="mint a development token (development configurations only)"
    )
    token.add_argument("--sub", default="alice", help="subject (default: alice)")
    token.add_argument(
        "--group", action="append", default=[], help="group (repeatable)"
    )
    token.add_argument(
        "--scope", action="append", default=[], help="scope (repeatable)"
    )
    token.add_argument(
        "--client", default="dev-agent", help="OAuth client id of the agent"
    )
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(run=_token)

    record_cli.add_commands(commands)
    approvals_cli.add_commands(commands)
    return parser


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from broker.server import build_broker

    config = load_config(args.config)
    configure_logging(config.log_format)
    broker = build_broker(config)
    _announce(config)
    uvicorn.run(broker.app, host=config.host, port=config.port, log_level="warning")
    return 0


def _announce(config: BrokerConfig) -> None:
    if config.development:
        print(BANNER.format(key=str(config.dev_key_path)), file=sys.stderr)
        print(
            f"\nAgents connect to {config.resource}\n"
            "with a token from:  broker token --sub alice --scope tools:call\n"
            "sent as:            Authorization: Bearer <token>\n",
            file=sys.stderr,
        )
    else:
        print(f"broker serving {config.resource}", file=sys.stderr)


def _check(args: argparse.Namespace) -> int:
    from broker.catalog import Catalog
    from broker.limits import check_tools
    from broker.manifest import load_manifests
    from broker.policy import PolicyEngine

    config = load_config(args.config)
    manifests = load_manifests(config.manifest_dir)
    pinned = Catalog(manifests).pinned
    engine = PolicyEngine.load(config.policy_dir, pinned)
    check_tools(config.limits, (tool.qualified_name for tool in pinned))
    tools = sum(len(m.tools) for m in manifests.values())
    print(
        f"ok: {len(manifests)} server(s), {tools} pinned tool(s), "
        f"policies in {config.policy_dir} valid ({engine.policy_count} policies)"
    )
    return 0


def _manifest_pull(args: argparse.Namespace) -> int:
    from broker.pull import pull_manifest

    config = load_config(args.config)
    changes = anyio.run(pull_manifest, config.manifest_dir, args.server)
    for line in changes:
        print(line)
    return 0


def _token(args: argparse.Namespace) -> int:
    from broker.auth.devkey import load_or_create_dev_key, mint_dev_token

    config = load_config(args.config)
    if not config.development:
        raise ConfigError(
            "tokens are only minted for a configuration with development = true"
        )
    key = load_or_create_dev_key(config.dev_key_path)
    print(
        mint_dev_token(
            key,
            resource=config.resource,
            subject=args.sub,
            groups=tuple(args.group),
            scopes=tuple(args.scope),
            client_id=args.client,
            ttl_seconds=args.ttl,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
