"""Running the MCP conformance suite and reading what it found.

The suite (``@modelcontextprotocol/conformance`` on npm) needs Node 22 or
later; both are installed into ``tests/conformance/node_modules`` by
``make conformance``. One run covers every server scenario and writes one
folder per scenario, ``server-<scenario>-<timestamp>/checks.json``, holding
the checks it made: an id, a status (SUCCESS, FAILURE, WARNING, or INFO for
what it merely logged) and, for a check that did not pass, a message.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
NODE = HERE / "node_modules" / ".bin" / "node"
CLI = HERE / "node_modules/@modelcontextprotocol/conformance/dist/index.js"
INSTALL_HINT = "run `make conformance` to install Node 22 and the suite"
# Every scenario, the ones the suite still calls pending included.
SUITE = "all"
RUN_TIMEOUT_SECONDS = 300
# Scenario folders end in the time of the run, e.g. -2026-12-03T19-10-18-278Z.
TIMESTAMP = re.compile(r"-\d{4}-\d{2}-\d{2}T[\d-]+Z$")
# Logged steps, not verdicts: their number and order follow timing.
NOT_A_VERDICT = "INFO"


class SuiteMissing(RuntimeError):
    """Node or the suite is not installed where the test looks for them."""


@dataclass(frozen=True)
class Check:
    id: str
    status: str
    message: str = ""


@dataclass
class Run:
    """One run of the suite against one URL."""

    url: str
    output: str
    scenarios: dict[str, list[Check]] = field(default_factory=dict)

    def verdicts(self) -> dict[tuple[str, str], list[str]]:
        """Each (scenario, check id) and its statuses, in order, INFO left out."""
        found: dict[tuple[str, str], list[str]] = defaultdict(list)
        for scenario, checks in self.scenarios.items():
            for check in checks:
                if check.status != NOT_A_VERDICT:
                    found[scenario, check.id].append(check.status)
        return dict(found)

    def passed(self) -> int:
        return sum(
            status == "SUCCESS"
            for statuses in self.verdicts().values()
            for status in statuses
        )

    def describe(self, scenario: str) -> str:
        """The suite's own account of one scenario: every check it made."""
        lines = [f"  {scenario} against {self.url}:"]
        for check in self.scenarios.get(scenario, []):
            said = f": {check.message}" if check.message else ""
            lines.append(f"    {check.status:<8} {check.id}{said}")
        if scenario not in self.scenarios:
            lines.append("    (no result: the scenario did not run)")
        return "\n".join(lines)


def require_installed() -> None:
    """Raise SuiteMissing, saying how to install them, unless both are there."""
    for path in (NODE, CLI):
        if not path.exists():
            raise SuiteMissing(f"{path} is missing: {INSTALL_HINT}")
    version = subprocess.run(
        [str(NODE), "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    major = version.lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 22:
        raise SuiteMissing(f"{NODE} is {version or 'broken'}: {INSTALL_HINT}")


def run_suite(url: str, output_dir: Path) -> Run:
    """Every server scenario against ``url``, once; results read from ``output_dir``."""
    require_installed()
    options = ["--url", url, "--suite", SUITE, "-o", str(output_dir)]
    completed = subprocess.run(
        [str(NODE), str(CLI), "server", *options],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )
    run = Run(url=url, output=completed.stdout + completed.stderr)
    for checks_file in sorted(output_dir.glob("server-*/checks.json")):
        scenario = TIMESTAMP.sub("", checks_file.parent.name).removeprefix("server-")
        raw: list[dict[str, Any]] = json.loads(checks_file.read_text(encoding="utf-8"))
        run.scenarios[scenario] = [
            Check(str(c["id"]), str(c["status"]), str(c.get("errorMessage") or ""))
            for c in raw
        ]
    return run


def differences(expected: Run, actual: Run) -> list[str]:
    """Every check whose verdicts differ between two runs, as one line each."""
    want, got = expected.verdicts(), actual.verdicts()
    lines = []
    for scenario, check_id in sorted(want.keys() | got.keys()):
        before = want.get((scenario, check_id), ["(absent)"])
        after = got.get((scenario, check_id), ["(absent)"])
        if before != after:
            lines.append(
                f"{scenario} / {check_id}: {'/'.join(before)} -> {'/'.join(after)}"
            )
    return lines


def report(expected: Run, actual: Run, changed: list[str]) -> str:
    """What differs, then both runs' account of every scenario concerned."""
    scenarios = sorted({line.split(" / ")[0] for line in changed})
    parts = [
        f"{len(changed)} check(s) differ from {expected.url} to {actual.url}:",
        *(f"  {line}" for line in changed),
        "",
        "The suite's checks for each scenario concerned:",
    ]
    for scenario in scenarios:
        parts += [expected.describe(scenario), actual.describe(scenario)]
    return "\n".join(parts)
