"""The reviewer's commands: audit verify and prune, report denied, replay."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from broker.audit import AuditEntry, SqliteStore
from broker.cli import main
from broker.when import iso
from tests.test_replay import AFTER_DEMO, AFTER_EXTRA, BEFORE, CALLS, policy_dir
from tests.test_report import NOW, SEEDED

REPO = Path(__file__).resolve().parents[1]
LAST_DAY = ["--since", iso(NOW - 86_400), "--until", iso(NOW + 1)]


def write_config(workdir: Path, store: str = "", policies: Path | None = None) -> Path:
    config = workdir / "broker.toml"
    config.write_text(
        f"""
[broker]
resource = "http://127.0.0.1:1/mcp"
development = true
dev_key_path = "dev-key.pem"
policy_dir = "{policies or REPO / "cedar_policies"}"
manifest_dir = "{REPO / "tool_manifests"}"

[store]
path = "state.db"
{store}
""",
        encoding="utf-8",
    )
    return config


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A configuration whose store holds the report tests' seeded decisions."""
    store = SqliteStore(tmp_path / "state.db")
    for entry in SEEDED:
        store.record(entry)
    store.close()
    return write_config(tmp_path)


def run(
    config: Path, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    status = main(["-c", str(config), *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_verify_confirms_the_count_of_entries(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An untouched store verifies with status 0, naming how many entries fitted."""
    status, out, _ = run(config, capsys, "audit", "verify")

    assert status == 0
    assert out.startswith(f"chain intact: {len(SEEDED)} entries checked")


def test_verify_reports_the_first_break(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An edited entry makes verify fail with its position and decision id."""
    with sqlite3.connect(config.parent / "state.db") as db:
        db.execute("UPDATE audit_entries SET subject = 'nobody' WHERE seq = 3")

    status, out, _ = run(config, capsys, "audit", "verify")

    assert status == 1
    assert "chain BROKEN at entry #3 (decision d2)" in out


def test_prune_keeps_the_rest_verifiable(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Pruning the oldest entry leaves a checkpoint and a chain that still holds."""
    status, out, _ = run(
        config, capsys, "audit", "prune", "--before", iso(NOW - 24 * 3600)
    )
    verified, checked, _ = run(config, capsys, "audit", "verify")

    assert status == 0
    assert out.startswith("pruned 1 entries through #1")
    assert verified == 0
    assert "after the checkpoint at #1" in checked


def test_prune_refuses_a_broken_chain(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a break in the record, nothing is pruned: the evidence stays."""
    with sqlite3.connect(config.parent / "state.db") as db:
        db.execute("DELETE FROM audit_entries WHERE seq = 2")

    status, out, _ = run(config, capsys, "audit", "prune", "--older-than", "1d")

    assert status == 1
    assert "not pruned" in out
    with sqlite3.connect(config.parent / "state.db") as db:
        (left,) = db.execute("SELECT count(*) FROM audit_entries").fetchone()
    assert left == len(SEEDED) - 1


def test_prune_needs_a_cut_off(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without an argument or a retention period, prune says what it needs."""
    status, _, err = run(config, capsys, "audit", "prune")

    assert status == 2
    assert "retention_days" in err


@pytest.mark.parametrize("form", ["table", "json", "csv"])
def test_report_denied_counts_in_every_format(
    config: Path, capsys: pytest.CaptureFixture[str], form: str
) -> None:
    """The seeded day's six denials come out of the store in each format."""
    status, out, _ = run(
        config, capsys, "report", "denied", *LAST_DAY, "--format", form
    )

    assert status == 0
    if form == "json":
        document = json.loads(out)
        assert (document["total"], document["shadow"]) == (6, 1)
        assert {g["name"]: g["count"] for g in document["by_category"]} == {
            "forbidden": 4,
            "not_found": 1,
            "unauthenticated": 1,
        }
    elif form == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert sorted(r["decision_id"] for r in rows) == [f"d{n}" for n in range(1, 7)]
    else:
        assert "6 denials (1 in shadow mode" in out


def test_report_denied_applies_filters(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Subject and policy filters narrow the store's denials."""
    _, out, _ = run(
        config,
        capsys,
        "report",
        "denied",
        *LAST_DAY,
        "--subject",
        "alice",
        "--policy",
        "transfer-limit",
        "--format",
        "json",
    )

    document = json.loads(out)
    assert [d["decision_id"] for d in document["denials"]] == ["d2"]
    assert document["filters"] == {"subject": "alice", "policy": "transfer-limit"}


def test_report_refuses_a_bad_span(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A span that does not parse ends with status 2 and says what was expected."""
    status, _, err = run(config, capsys, "report", "denied", "--last", "a while")

    assert status == 2
    assert "not a span" in err


def test_report_without_a_store_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reviewer pointed at the wrong configuration is told, and no file is made."""
    config = write_config(tmp_path)

    status, _, err = run(config, capsys, "report", "denied")

    assert status == 2
    assert "does not exist" in err
    assert not (tmp_path / "state.db").exists()


def _replay_setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    before = policy_dir(tmp_path / "before", BEFORE)
    after = policy_dir(tmp_path / "after", BEFORE + AFTER_EXTRA, AFTER_DEMO)
    calls = tmp_path / "calls.jsonl"
    calls.write_text("\n".join(json.dumps(c) for c in CALLS), encoding="utf-8")
    return write_config(tmp_path, policies=before), after, calls


def test_replay_prints_each_outcome(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One policy directory: a line per call and a tally of outcomes."""
    config, _, calls = _replay_setup(tmp_path)

    status, out, _ = run(config, capsys, "replay", "--calls", str(calls))

    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 1 + len(CALLS) + 1
    assert lines[-1] == ("9 calls: 5 allow, 2 deny, 1 needs_approval, 1 not_found.")
    assert "destructive-needs-approval" in lines[5]


def test_replay_against_prints_only_the_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two policy directories: exactly the two calls whose outcome changes."""
    config, after, calls = _replay_setup(tmp_path)

    status, out, _ = run(
        config, capsys, "replay", "--calls", str(calls), "--against", str(after)
    )
    _, as_json, _ = run(
        config,
        capsys,
        "replay",
        "--calls",
        str(calls),
        "--against",
        str(after),
        "--format",
        "json",
    )

    assert status == 0
    rows = out.splitlines()[1:-1]
    assert [row.split()[:2] for row in rows] == [["line", "2"], ["line", "4"]]
    assert out.splitlines()[-1] == "2 of 9 calls change outcome."
    changes = [json.loads(row) for row in as_json.splitlines()]
    assert [
        (c["call"], c["before"]["outcome"], c["after"]["outcome"]) for c in changes
    ] == [
        ("line 2", "allow", "deny"),
        ("line 4", "allow", "needs_approval"),
    ]


def test_replay_from_the_record_says_arguments_are_redacted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Replaying recorded calls warns that redacted arguments can change decisions."""
    config, _, _ = _replay_setup(tmp_path)
    store = SqliteStore(tmp_path / "state.db")
    store.record(
        AuditEntry(
            "r1",
            NOW,
            "tools/call",
            "allow",
            "allowed",
            subject="alice",
            tool="demo.echo",
            arguments={"text": "[REDACTED:email]"},
            groups=("eng",),
            scopes=("tools:call",),
        )
    )
    store.close()

    status, out, err = run(config, capsys, "replay", *LAST_DAY, "--format", "json")

    assert status == 0
    assert "keeps arguments redacted" in err
    (line,) = out.splitlines()
    assert json.loads(line)["outcome"] == "allow"


def test_replay_takes_a_file_or_a_range_not_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Calls come from one place; asking for two is refused."""
    config, _, calls = _replay_setup(tmp_path)

    status, _, err = run(
        config, capsys, "replay", "--calls", str(calls), "--last", "1h"
    )

    assert status == 2
    assert "not both" in err
