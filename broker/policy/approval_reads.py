"""Which policies read ``context.approval``, so that granting one can matter.

Granting approval changes one value of the request, ``context.approval``. A
policy whose conditions never read it evaluates the same either way, so when
a call is denied by such a forbid, or denied for want of a permit while no
permit reads approval, the call would be denied with approval too, and
Cedar need not be asked again.

A policy counts as reading approval when a condition takes
``context.approval``, tests ``context has approval``, or uses ``context``
in any other way (``context == {...}`` compares the approval too). Getting
this wrong in the other direction could only deny a call that approval
would have let through: the check never allows anything.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from cedarpy import pst

APPROVAL = "approval"


def reads_approval(policy: pst.Template) -> bool:
    """Whether any condition of ``policy`` may read ``context.approval``."""
    return any(_reads(node) for node in _walk(policy.clauses))


def _reads(node: object) -> bool:
    """A use of ``context`` that may reach its approval."""
    if isinstance(node, pst.GetAttr) and _is_context(node.base):
        return node.attr == APPROVAL
    if isinstance(node, pst.HasAttr) and _is_context(node.base):
        return node.attrs[:1] == (APPROVAL,)
    # _walk reaches a bare context only where no attribute of it is read:
    # the record used whole.
    return _is_context(node)


def _walk(root: object) -> Iterator[object]:
    """Every node under ``root``; the ``context`` of an attribute read is skipped.

    The attribute read itself is yielded and judged by ``_reads``: descending
    into its base would find a bare ``context`` and count it as a whole use.
    """
    stack: list[Any] = [root]
    while stack:
        value = stack.pop()
        if isinstance(value, tuple):
            stack.extend(value)
            continue
        if isinstance(value, Mapping):
            stack.extend(value.values())
            continue
        if not (is_dataclass(value) and not isinstance(value, type)):
            continue
        yield value
        if isinstance(value, pst.GetAttr | pst.HasAttr) and _is_context(value.base):
            continue
        stack.extend(getattr(value, f.name) for f in fields(value))


def _is_context(node: object) -> bool:
    return isinstance(node, pst.Var) and node.name == "context"
