"""Detectors of sensitive data in tool arguments.

One walk over the arguments serves two readers. The classes it finds go into
the Cedar context as ``context.data``, so a policy can forbid, say, a card
number on its way to an open-world tool. The redacted copy goes into the
audit record, so the record never holds what the policy was guarding.

Classes, by the names policies use:

    jwt            three base64url segments, the first starting ``eyJ``
    bearer_token   ``Bearer <token>``
    private_key    a PEM private key block, redacted whole
    cloud_key      AWS, GCP service-account, GitHub, Slack and Google API keys
    card_number    13 to 19 digits, starting 2 to 6, that pass the Luhn check
    email          an email address
    secret         the value of a key named like a credential (``password``)
    too_deep       values nested deeper than MAX_DEPTH, not scanned
    too_large      a string over MAX_KEPT_CHARS: scanned in full, stored as a mark

Strings of any length are scanned in full, so padding a secret with a
megabyte of text does not hide it from a policy; only the redacted copy drops
a long string, to keep audit writes small. The time spent is linear in the
size of the arguments: every pattern is anchored and every repeat is bounded.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

MAX_DEPTH = 32
MAX_KEPT_CHARS = 1 << 20

CLASSES = frozenset(
    {
        "jwt",
        "bearer_token",
        "private_key",
        "cloud_key",
        "card_number",
        "email",
        "secret",
        "too_deep",
        "too_large",
    }
)
_MARK = {name: f"[REDACTED:{name}]" for name in CLASSES}


@dataclass(frozen=True, slots=True)
class Findings:
    """The classes of sensitive data found, and the arguments without them."""

    classes: frozenset[str]
    redacted: object


def inspect(arguments: object) -> Findings:
    """Classify and redact a JSON value; the input is left unchanged."""
    found: set[str] = set()
    redacted = _walk(arguments, found, 0)
    return Findings(frozenset(found), redacted)


def redact_text(text: str) -> str:
    """``text`` with every match of a detector replaced by its mark."""
    return _scan(text, set())


def _walk(value: object, found: set[str], depth: int) -> object:
    if depth > MAX_DEPTH:
        found.add("too_deep")
        return _MARK["too_deep"]
    if isinstance(value, str):
        return _scan_string(value, found)
    if value is None or isinstance(value, bool | float):
        return value
    if isinstance(value, int):
        text = str(value)
        scanned = _scan(text, found)
        return value if scanned == text else scanned
    if isinstance(value, dict):
        return _walk_dict(value, found, depth + 1)
    if isinstance(value, list | tuple):
        return [_walk(item, found, depth + 1) for item in value]
    return _scan_string(str(value), found)


def _walk_dict(
    mapping: dict[object, object], found: set[str], depth: int
) -> dict[str, object]:
    redacted: dict[str, object] = {}
    service_account = mapping.get("type") == "service_account"
    for key, value in mapping.items():
        name, key_classes, cls = _key_facts(str(key))
        found.update(key_classes)
        name = _unique(name, redacted)
        if service_account and _normal_key(str(key)) in _SERVICE_ACCOUNT_KEYS:
            cls = "cloud_key"
        if cls is None or value is None or value == "":
            redacted[name] = _walk(value, found, depth)
            continue
        # The whole value goes, but what it holds still counts for policy.
        _walk(value, found, depth)
        found.add(cls)
        redacted[name] = _MARK[cls]
    return redacted


def _key_facts(key: str) -> tuple[str, frozenset[str], str | None]:
    """A key as recorded, what it holds, and the class its name gives a value."""
    # Keys come from a tool's input schema and repeat from call to call; long
    # ones are not kept, so the cache stays small whatever agents send.
    return _cached_key_facts(key) if len(key) <= 256 else _read_key(key)


def _read_key(key: str) -> tuple[str, frozenset[str], str | None]:
    found: set[str] = set()
    return _scan(key, found), frozenset(found), _credential_class(_normal_key(key))


_cached_key_facts = functools.lru_cache(maxsize=4096)(_read_key)


def _unique(name: str, taken: dict[str, object]) -> str:
    # Two keys redacted to the same mark must not overwrite each other.
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}#{n}"
    return candidate


def _normal_key(key: str) -> str:
    return key.lower().replace("-", "").replace("_", "")


def _credential_class(norm: str) -> str | None:
    if norm.endswith("awssecretaccesskey"):
        return "cloud_key"
    if norm in _NOT_CREDENTIALS or not norm.endswith(_CREDENTIAL_ENDINGS):
        return None
    return "secret"


# Keys that end like a credential but name a paging cursor.
_NOT_CREDENTIALS = frozenset(
    {"pagetoken", "nextpagetoken", "nexttoken", "continuationtoken", "synctoken"}
)
_CREDENTIAL_ENDINGS = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "privatekey",
    "authorization",
)
_SERVICE_ACCOUNT_KEYS = frozenset({"privatekey", "privatekeyid"})


def _scan_string(text: str, found: set[str]) -> str:
    scanned = _scan(text, found)
    if len(text) <= MAX_KEPT_CHARS:
        return scanned
    found.add("too_large")
    return _MARK["too_large"]


def _scan(text: str, found: set[str]) -> str:
    return _run(text, found, _DETECTORS)


def _run(text: str, found: set[str], detectors: tuple[_Detector, ...]) -> str:
    if len(text) < 6:  # shorter than the shortest match, ``a@b.cd``
        return text
    lowered = text.lower()
    for detector in detectors:
        if _any_in(lowered, detector.words) and _any_in(lowered, detector.also):
            text = detector.pattern.sub(detector.replacer(found), text)
    return text


def _any_in(lowered: str, words: tuple[str, ...]) -> bool:
    if not words:
        return True
    # A plain loop, not any() on a generator: this runs a dozen times for
    # every string and is twice as fast.
    for word in words:  # noqa: SIM110
        if word in lowered:
            return True
    return False


_Handler = Callable[["_Detector", re.Match[str], set[str]], str]


@dataclass(frozen=True, slots=True)
class _Detector:
    """One kind of sensitive data, and a cheap test of whether to look for it.

    The pattern runs only if the lower-cased text holds one of ``words`` (and
    one of ``also``, if given); most strings hold none. A group named ``v``
    marks the part to redact, and the rest of a match (a label such as
    ``aws_secret_access_key=``) is kept.
    """

    cls: str
    pattern: re.Pattern[str]
    words: tuple[str, ...]
    handler: _Handler
    also: tuple[str, ...] = ()

    def replacer(self, found: set[str]) -> Callable[[re.Match[str]], str]:
        return lambda match: self.handler(self, match, found)


def _redact(detector: _Detector, match: re.Match[str], found: set[str]) -> str:
    return _mark(match, detector.cls, found)


def _mark(match: re.Match[str], cls: str, found: set[str]) -> str:
    found.add(cls)
    if "v" not in match.re.groupindex:
        return _MARK[cls]
    start, end = match.span("v")
    whole = match.group()
    offset = match.start()
    return whole[: start - offset] + _MARK[cls] + whole[end - offset :]


def _card(detector: _Detector, match: re.Match[str], found: set[str]) -> str:
    text = match.group()
    pieces: list[str] = []
    kept_from = 0
    for start, end in _card_spans(text):
        pieces += [text[kept_from:start], _MARK[detector.cls]]
        kept_from = end
    if not pieces:
        return text
    found.add(detector.cls)
    return "".join(pieces) + text[kept_from:]


_Group = tuple[int, int, str]


def _card_spans(text: str) -> Iterator[tuple[int, int]]:
    """Where in a run of digit groups the card numbers lie.

    A card is one group of 13 to 19 digits, or consecutive groups of 3 to 6
    digits as cards are printed (4-4-4-4, 4-6-5). The second rule keeps the
    all-digit tail of a UUID, and lists of small numbers, from counting.
    """
    groups = [(run.start(), run.end(), run.group()) for run in _DIGITS.finditer(text)]
    first = 0
    while first < len(groups):
        last = _card_end(groups, first)
        if last is None:
            first += 1
            continue
        yield groups[first][0], groups[last][1]
        first = last + 1


def _card_end(groups: list[_Group], first: int) -> int | None:
    head = groups[first][2]
    # Payment cards start with 2 to 6 (the major industry identifier); this
    # spares epoch milliseconds and other ids that happen to pass Luhn.
    if head[0] not in "23456":
        return None
    if 13 <= len(head) <= 19 and _luhn_ok(head):
        return first
    digits = ""
    # At most six groups of three or more digits fit in nineteen.
    for index in range(first, min(first + 6, len(groups))):
        group = groups[index][2]
        digits += group
        if not 3 <= len(group) <= 6 or len(digits) > 19:
            break
        if len(digits) >= 13 and _luhn_ok(digits):
            return index
    return None


def _luhn_ok(digits: str) -> bool:
    raw = digits.encode("ascii")
    # Every second digit from the right is doubled, by table: 7 -> 14 -> 5.
    total = sum(raw[-1::-2]) + sum(raw[-2::-2].translate(_LUHN_DOUBLED))
    return (total - len(raw) * ord("0")) % 10 == 0


_LUHN_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")


def _bearer(detector: _Detector, match: re.Match[str], found: set[str]) -> str:
    token = match.group("v")
    # "Bearer instruments" is prose; a token has a digit or a symbol in it.
    if token.isalpha():
        return match.group()
    if _JWT.fullmatch(token):
        found.add("jwt")
    return _mark(match, detector.cls, found)


def _assignment(detector: _Detector, match: re.Match[str], found: set[str]) -> str:
    value = match.group("v")
    if value.startswith("[REDACTED:"):
        return match.group()
    cls = _credential_class(_normal_key(match.group("k")))
    # What a credential's value holds (a JWT, a GitHub token) counts too; the
    # value is not searched for further assignments, which would be quadratic.
    scanned = _run(value, found, _VALUE_DETECTORS)
    if cls is not None:
        return _mark(match, cls, found)
    start, end = match.span("v")
    offset = match.start()
    whole = match.group()
    return whole[: start - offset] + scanned + whole[end - offset :]


_B64URL = r"[A-Za-z0-9_-]"
_JWT_PATTERN = (
    rf"(?<!{_B64URL})eyJ{_B64URL}{{1,8192}}\.{_B64URL}{{1,65536}}"
    rf"\.{_B64URL}{{0,8192}}"
)
_JWT = re.compile(_JWT_PATTERN)
_DIGITS = re.compile(r"[0-9]+")

# In order: a detector sees the text with earlier matches already replaced,
# so a key block is gone before the ones that could match inside it run.
_DETECTORS = (
    _Detector(
        "private_key",
        # The body stops at the first run of five dashes, so a missing END
        # line costs one pass and cannot make the scan quadratic.
        re.compile(
            r"-----BEGIN (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY-----"
            r"(?:[^-]|-(?!----)){0,65536}"
            r"(?:-----END (?:[A-Z0-9]{1,16} ){0,3}PRIVATE KEY-----)?"
        ),
        ("private key",),
        _redact,
    ),
    _Detector(
        "cloud_key",
        re.compile(
            r"(?i:aws_?secret_?access_?key)[\"']?\s{0,4}[:=]\s{0,4}[\"']?"
            r"(?P<v>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+])"
        ),
        ("secret",),
        _redact,
    ),
    _Detector(
        "cloud_key",
        re.compile(r"\"private_key_id\"\s{0,4}:\s{0,4}\"(?P<v>[0-9a-f]{40})\""),
        ("private_key_id",),
        _redact,
    ),
    _Detector(
        "secret",
        re.compile(
            r"(?<![A-Za-z0-9])(?P<k>(?i:[a-z0-9_-]{0,32}"
            r"(?:pass(?:word|wd|phrase)|secret|token|(?:api|access|private)[_-]?key"
            r"|authorization)))[\"']?\s{0,4}[:=]\s{0,4}[\"']?"
            r"(?P<v>(?i:(?:basic|bearer|digest)[ \t]{1,4})?[^\s\"',;&]{1,512})"
        ),
        ("pass", "secret", "token", "key", "authorization"),
        _assignment,
        also=("=", ":"),
    ),
    _Detector(
        "bearer_token",
        re.compile(
            r"(?<![A-Za-z0-9])(?i:bearer)[ \t]{1,4}"
            r"(?P<v>[A-Za-z0-9._~+/-]{8,8192}={0,2})"
        ),
        ("bearer",),
        _bearer,
    ),
    _Detector("jwt", _JWT, ("eyj",), _redact),
    _Detector(
        "cloud_key",
        re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
        ("akia", "asia"),
        _redact,
    ),
    _Detector(
        "cloud_key",
        re.compile(
            r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{30,255}"
            r"|github_pat_[A-Za-z0-9_]{22,255})"
        ),
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        _redact,
    ),
    _Detector(
        "cloud_key",
        re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9-]{10,250}"),
        ("xox",),
        _redact,
    ),
    _Detector(
        "cloud_key",
        re.compile(r"(?<![A-Za-z0-9_-])AIza[A-Za-z0-9_-]{35}"),
        ("aiza",),
        _redact,
    ),
    _Detector(
        "email",
        re.compile(
            r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}"
            r"@(?:[A-Za-z0-9-]{1,63}\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9-])"
        ),
        ("@",),
        _redact,
    ),
    _Detector(
        "card_number",
        # A group of 13 to 19 digits, or a run of groups of 3 to 6 digits, not
        # the tail of a longer number or of a decimal fraction. It opens with
        # a digit so that the engine can skip to one fast; _card looks inside.
        re.compile(
            r"[0-9](?<![0-9.][0-9])"
            r"(?:[0-9]{12,18}(?![0-9])"
            r"|[0-9]{2,5}(?![0-9])(?:[ -][0-9]{3,6}(?![0-9])){1,63})"
        ),
        (),
        _card,
    ),
)
_VALUE_DETECTORS = tuple(d for d in _DETECTORS if d.handler is not _assignment)
