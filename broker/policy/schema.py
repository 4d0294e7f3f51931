"""The Cedar types of tool arguments, read from each tool's JSON Schema.

Every pinned tool gets an action of its own, ``Action::"call:<server>.<tool>"``,
whose ``context.input`` is a record typed from the tool's input schema. One
type tree both writes that action into the schema and shapes the arguments of
each call, so the two cannot disagree.

Known shortcoming: only strings, integers, booleans, numbers, arrays of those
and objects with properties have a Cedar type. A property of any other shape
(anyOf, oneOf, $ref, a list of types, an array of objects, no type at all) is
left out of the record, and its argument is left out of ``context.input``:
policies cannot see it, although it still goes downstream. Cedar has neither
unions nor null to map such shapes onto; until it does, a rule about one of
those arguments has to rely on the classifier (``context.data``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal, TypeGuard

from broker.manifest import ToolSpec

LONG_MIN = -(2**63)
LONG_MAX = 2**63 - 1

ScalarName = Literal["String", "Long", "Bool", "decimal"]


@dataclass(frozen=True, slots=True)
class Scalar:
    name: ScalarName


@dataclass(frozen=True, slots=True)
class SetOf:
    item: Scalar | SetOf


@dataclass(frozen=True, slots=True)
class Attribute:
    type: CedarType
    required: bool


@dataclass(frozen=True, slots=True)
class Record:
    """A record type, and the properties left out of it for want of a type."""

    attributes: Mapping[str, Attribute]
    left_out: frozenset[str]


CedarType = Scalar | SetOf | Record

_ESCAPES = {
    "\0": "\\0",
    "\t": "\\t",
    "\n": "\\n",
    "\r": "\\r",
    '"': '\\"',
    "'": "\\'",
    "\\": "\\\\",
}

_SCALARS: Mapping[str, Scalar] = {
    "string": Scalar("String"),
    "integer": Scalar("Long"),
    "boolean": Scalar("Bool"),
    "number": Scalar("decimal"),
}


def input_record(schema: Mapping[str, object]) -> Record:
    """The type of a tool's ``context.input``; no properties means no arguments."""
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return Record({}, frozenset())
    required = schema.get("required")
    wanted = set(required) if isinstance(required, list) else set()
    attributes: dict[str, Attribute] = {}
    left_out: set[str] = set()
    for name, prop in properties.items():
        kind = _cedar_type(prop)
        if kind is None:
            left_out.add(name)
        else:
            attributes[name] = Attribute(kind, name in wanted)
    return Record(attributes, frozenset(left_out))


def _cedar_type(schema: object) -> CedarType | None:
    if not isinstance(schema, Mapping):
        return None
    kind = schema.get("type")
    if not isinstance(kind, str):
        return None
    if kind in _SCALARS:
        return _SCALARS[kind]
    if kind == "array":
        item = _cedar_type(schema.get("items"))
        return SetOf(item) if isinstance(item, Scalar | SetOf) else None
    if kind == "object" and schema.get("properties"):
        return input_record(schema)
    return None


def tool_action(tool: ToolSpec, record: Record) -> str:
    """The schema text declaring the action that calls ``tool``."""
    name = cedar_string(f"call:{tool.qualified_name}")
    return (
        f"action {name} in [call_tool] appliesTo {{\n"
        "  principal: [User],\n"
        "  resource: [Tool],\n"
        "  context: {\n"
        "    client: String,\n"
        "    scopes: Set<String>,\n"
        "    data: Set<String>,\n"
        "    approval: Approval,\n"
        "    now: Long,\n"
        f"    input: {render(record)},\n"
        "  },\n"
        "};\n"
    )


def render(kind: CedarType) -> str:
    """``kind`` in Cedar schema syntax."""
    if isinstance(kind, Scalar):
        return kind.name
    if isinstance(kind, SetOf):
        return f"Set<{render(kind.item)}>"
    # Every name is quoted, so identifiers and other names read alike.
    fields = (
        f"{cedar_string(name)}{'' if attr.required else '?'}: {render(attr.type)}"
        for name, attr in kind.attributes.items()
    )
    return "{" + ", ".join(fields) + "}"


def cedar_string(text: str) -> str:
    """``text`` as a quoted Cedar string literal, escaped as Cedar prints it.

    Cedar parses an entity id given as text only in that normal form. Should
    Python and Cedar disagree on what is printable, the id does not parse and
    a listing leaves the item out; decisions pass ids as JSON, unaffected.
    """
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:
            out.append(f"\\u{{{ord(char):x}}}")
    return '"' + "".join(out) + '"'


def cedar_value(kind: CedarType, value: object, path: str) -> object:
    """``value`` in Cedar's JSON form for ``kind``; ValueError if it does not fit.

    Numbers become decimals and left-out properties are dropped. Checking the
    shape here, before Cedar's own request validation, also means no argument
    can smuggle in one of Cedar's ``__extn`` or ``__entity`` escapes.
    """
    if isinstance(kind, Record):
        return _record_value(kind, value, path)
    if isinstance(kind, SetOf):
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected an array")
        return [cedar_value(kind.item, item, f"{path}[]") for item in value]
    return _scalar_value(kind.name, value, path)


def _record_value(kind: Record, value: object, path: str) -> dict[str, object]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: expected an object")
    out: dict[str, object] = {}
    for name, item in value.items():
        if name in kind.left_out:
            continue
        attr = kind.attributes.get(name)
        if attr is None:
            raise ValueError(f"{path}.{name}: not in the tool's input schema")
        out[name] = cedar_value(attr.type, item, f"{path}.{name}")
    return out


def _scalar_value(name: ScalarName, value: object, path: str) -> object:
    if name == "decimal" and _is_number(value):
        return {"__extn": {"fn": "decimal", "arg": _decimal_text(value, path)}}
    if name == "Long" and _is_long(value):
        return value
    if name == "String" and isinstance(value, str):
        return value
    if name == "Bool" and isinstance(value, bool):
        return value
    raise ValueError(f"{path}: expected {name}")


def _is_number(value: object) -> TypeGuard[int | float]:
    # JSON's true and false arrive as Python bools, which are ints too.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_long(value: object) -> bool:
    return (
        _is_number(value) and isinstance(value, int) and LONG_MIN <= value <= LONG_MAX
    )


def _decimal_text(value: int | float, path: str) -> str:
    # Cedar's decimal holds four places and about nine hundred trillion; it
    # refuses any other value, which leaves the request undecided (a denial).
    number = Decimal(repr(value))
    if not number.is_finite():
        raise ValueError(f"{path}: {value!r} is not a decimal")
    text = format(number, "f")
    return text if "." in text else text + ".0"
