"""The commands a security reviewer runs on the record.

``broker audit verify``   walk the hash chain, report the first break
``broker audit prune``    remove entries past retention, keep a checkpoint
``broker report denied``  denied calls, grouped and listed (table, JSON, CSV)
``broker replay``         decide calls against policy directories, offline

Each reads the store and directories named in the configuration. Exit
status: 0 when all is well, 1 when ``verify`` finds a break or ``prune``
refuses, 2 for unusable input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from broker import replay as replaying
from broker.audit import Store
from broker.chain import describe
from broker.config import BrokerConfig, load_config
from broker.errors import ConfigError, RecordFailed
from broker.report import EXACT_FILTERS, build, filters_from, read_denials
from broker.report_render import FORMATS, columns, printable, render
from broker.retention import cutoff
from broker.stores import open_store
from broker.when import parse_instant, parse_span

Run = Callable[[argparse.Namespace], int]

# The most recorded entries one replay reads.
REPLAY_LIMIT = 100_000

_FILTER_HELP = {
    "subject": "only this principal (token subject)",
    "client": "only this agent (OAuth client id)",
    "server": "only this downstream server",
    "tool": "only this tool, as <server>.<tool>",
    "category": "only this reason, e.g. forbidden, not_found, unauthenticated",
    "policy": "only denials decided by this policy @id",
}


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit``, ``report`` and ``replay`` to the ``broker`` command."""
    _add_audit(commands)
    _add_report(commands)
    _add_replay(commands)


def _add_audit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = commands.add_parser("audit", help="check or prune the audit record")
    actions = audit.add_subparsers(required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="walk the hash chain and report the first break"
    )
    verify.set_defaults(run=_guarded(_audit_verify))
    prune = actions.add_parser(
        "prune", help="remove old entries, leaving a checkpoint that still verifies"
    )
    when = prune.add_mutually_exclusive_group()
    when.add_argument("--before", help="ISO time (default: [store] retention_days)")
    when.add_argument("--older-than", help="a span such as 90d")
    prune.set_defaults(run=_guarded(_audit_prune))


def _add_report(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    report = commands.add_parser("report", help="reports on the record")
    kinds = report.add_subparsers(required=True, metavar="REPORT")
    denied = kinds.add_parser("denied", help="denied calls, grouped and listed")
    _add_time_range(denied)
    for name in EXACT_FILTERS:
        denied.add_argument(f"--{name}", help=_FILTER_HELP[name])
    denied.add_argument("--format", choices=FORMATS, default="table")
    denied.set_defaults(run=_guarded(_report_denied))


def _add_replay(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    replay = commands.add_parser(
        "replay", help="decide calls against policies without forwarding anything"
    )
    replay.add_argument(
        "--policies", type=Path, help="policy directory (default: the configured one)"
    )
    replay.add_argument(
        "--against",
        type=Path,
        help="a second policy directory: print only calls whose outcome changes",
    )
    replay.add_argument(
        "--calls", type=Path, help="JSON lines file of calls (default: the record)"
    )
    _add_time_range(replay)
    replay.add_argument("--format", choices=("text", "json"), default="text")
    replay.set_defaults(run=_guarded(_replay))


def _add_time_range(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", help="ISO time, UTC unless it says otherwise")
    parser.add_argument("--last", help="a span back from --until or now (24h)")
    parser.add_argument("--until", help="ISO time (exclusive; default: now)")


def _guarded(run: Run) -> Run:
    """Bad input and an unreadable store end the command with status 2."""

    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ValueError as exc:
            print(f"broker: {exc}", file=sys.stderr)
            return 2
        except RecordFailed as exc:
            print(f"broker: audit store: {exc.detail}", file=sys.stderr)
            return 2

    return guarded


def _open_store(config: BrokerConfig) -> Store:
    path = Path(config.store.path)
    if config.store.type == "sqlite" and not path.is_file():
        raise ConfigError(f"audit store {path} does not exist")
    return open_store(config.store)


# ---- audit ------------------------------------------------------------------------


def _audit_verify(args: argparse.Namespace) -> int:
    store = _open_store(load_config(args.config))
    try:
        verification = store.verify()
    finally:
        store.close()
    print(describe(verification))
    return 0 if verification.intact else 1


def _audit_prune(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    now = time.time()
    before = _prune_before(args, config, now)
    store = _open_store(config)
    try:
        verification = store.verify()
        if not verification.intact:
            print(describe(verification))
            print("not pruned: pruning a broken chain could remove the evidence")
            return 1
        checkpoint = store.prune(before, now=now)
    finally:
        store.close()
    if checkpoint is None:
        print("nothing to prune")
    else:
        print(
            f"pruned {checkpoint.pruned} entries through #{checkpoint.through_seq}; "
            f"checkpoint hash {checkpoint.hash}"
        )
    return 0


def _prune_before(args: argparse.Namespace, config: BrokerConfig, now: float) -> float:
    if args.before:
        return parse_instant(args.before)
    if args.older_than:
        return now - parse_span(args.older_than)
    if config.store.retention_days is None:
        raise ValueError("give --before or --older-than, or set [store] retention_days")
    return cutoff(config.store.retention_days, now)


# ---- report ----------------------------------------------------------------------


def _report_denied(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    now = time.time()
    filters = filters_from(vars(args), now=now)
    store = _open_store(config)
    try:
        entries, truncated = read_denials(store, filters)
    finally:
        store.close()
    report = build(entries, filters, now=now, truncated=truncated)
    sys.stdout.write(render(report, args.format))
    return 0


# ---- replay ----------------------------------------------------------------------


def _replay(args: argparse.Namespace) -> int:
    from broker.catalog import Catalog
    from broker.manifest import load_manifests
    from broker.policy import PolicyEngine

    config = load_config(args.config)
    tools = {
        t.qualified_name: t for t in Catalog(load_manifests(config.manifest_dir)).pinned
    }
    policies = args.policies or config.policy_dir
    engine = PolicyEngine.load(policies, tools.values())
    against = None
    if args.against is not None:
        against = PolicyEngine.load(args.against, tools.values())
    calls = _calls(args, config)
    results = replaying.replay(calls, tools, engine, against)
    if args.format == "json":
        _print_json(results, against is not None)
    else:
        _print_text(results, against is not None)
    return 0


def _calls(args: argparse.Namespace, config: BrokerConfig) -> list[replaying.Call]:
    now = time.time()
    if args.calls is not None:
        if args.since or args.last or args.until:
            raise ValueError("give --calls or a time range of the record, not both")
        return _calls_from_file(args.calls, config, now)
    filters = filters_from(vars(args), now=now)
    store = _open_store(config)
    try:
        entries = store.entries(
            since=filters.since, until=filters.until, limit=REPLAY_LIMIT
        )
    finally:
        store.close()
    calls = replaying.calls_from_record(entries)
    _say_where_calls_came_from(calls)
    return calls


def _calls_from_file(
    path: Path, config: BrokerConfig, now: float
) -> list[replaying.Call]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read calls from {path}: {exc}") from exc
    return replaying.calls_from_lines(
        text.splitlines(), config, now=now, name=str(path)
    )


def _say_where_calls_came_from(calls: Sequence[replaying.Call]) -> None:
    # On stderr, so that --format json keeps stdout to JSON lines.
    print(replaying.REDACTED_NOTE, file=sys.stderr)
    missing = replaying.without_claims(calls)
    if missing:
        print(
            f"{missing} of {len(calls)} recorded calls carry no groups or scopes "
            "and are decided without them.",
            file=sys.stderr,
        )


def _print_text(results: Sequence[replaying.Replayed], comparing: bool) -> None:
    rows, summary = _changes(results) if comparing else _outcomes(results)
    if len(rows) > 1:
        for line in columns(rows):
            print(line)
    print(summary)


Rows = list[tuple[str, ...]]
_WHO = ("CALL", "PRINCIPAL", "AGENT", "TOOL")


def _changes(results: Sequence[replaying.Replayed]) -> tuple[Rows, str]:
    changed = [r for r in results if r.changed]
    rows: Rows = [
        ("CALL", "PRINCIPAL", "AGENT", "TOOL", "BEFORE", "AFTER", "DECIDED BY")
    ]
    rows += [(*_who(r), r.before.outcome, _after(r).outcome, _by(r)) for r in changed]
    return rows, f"{len(changed)} of {len(results)} calls change outcome."


def _outcomes(results: Sequence[replaying.Replayed]) -> tuple[Rows, str]:
    rows: Rows = [(*_WHO, "OUTCOME", "DECIDED BY")]
    rows += [(*_who(r), r.before.outcome, _policies(r.before)) for r in results]
    counts = Counter(r.before.outcome for r in results)
    tally = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
    return rows, f"{len(results)} calls: {tally or 'none'}."


def _who(result: replaying.Replayed) -> tuple[str, str, str, str]:
    call = result.call
    return (
        call.source,
        printable(call.principal.subject),
        printable(call.principal.client_id),
        printable(call.tool),
    )


def _after(result: replaying.Replayed) -> replaying.Outcome:
    if result.after is None:
        raise ValueError("no second outcome to compare with")
    return result.after


def _by(result: replaying.Replayed) -> str:
    return f"{_policies(result.before)} -> {_policies(_after(result))}"


def _policies(outcome: replaying.Outcome) -> str:
    named = ", ".join(outcome.policies)
    if outcome.errors:
        named += (" " if named else "") + f"({len(outcome.errors)} policy errors)"
    return named or "-"


def _print_json(results: Sequence[replaying.Replayed], comparing: bool) -> None:
    for result in results:
        if comparing and not result.changed:
            continue
        call = result.call
        line: dict[str, object] = {
            "call": call.source,
            "subject": call.principal.subject,
            "client": call.principal.client_id,
            "tool": call.tool,
        }
        if comparing:
            line["before"] = _outcome_json(result.before)
            line["after"] = _outcome_json(_after(result))
        else:
            line.update(_outcome_json(result.before))
        print(json.dumps(line, ensure_ascii=False))


def _outcome_json(outcome: replaying.Outcome) -> dict[str, object]:
    return {
        "outcome": outcome.outcome,
        "policies": list(outcome.policies),
        "errors": list(outcome.errors),
    }
