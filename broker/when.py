"""Times as a reviewer types them, and as reports print them (always UTC).

An instant is ISO 8601 (``2026-12-03``, ``2026-12-03T14:05``, with or without
an offset; without one it is read as UTC). A span is a number and a unit:
``90s``, ``15m``, ``24h``, ``7d``, ``2w``. Both raise ValueError with a
sentence saying what was expected.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_SPAN = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_instant(text: str) -> float:
    """Seconds since the epoch for an ISO 8601 date or time."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time, e.g. 2026-12-03T14:05Z"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_span(text: str) -> float:
    """Seconds in a span such as ``24h`` or ``7d``."""
    match = _SPAN.match(text)
    if match is None or int(match[1]) == 0:
        raise ValueError(f"{text!r} is not a span such as 90s, 15m, 24h, 7d or 2w")
    return float(int(match[1]) * _UNIT_SECONDS[match[2]])


def iso(seconds: float) -> str:
    """``seconds`` as an ISO 8601 UTC time, to the second."""
    moment = datetime.fromtimestamp(seconds, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def shown(seconds: float) -> str:
    """``seconds`` as a person reads a UTC time in a table."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
