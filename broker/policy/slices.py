"""Per action, only the policies that can apply to it.

Cedar evaluates every policy in the set for every request, so with one policy
per tool a decision costs time in proportion to the number of tools. A policy
whose action scope cannot contain the request's action can never be
satisfied, so leaving it out changes no decision. A slice keeps a policy
unless its scope is certain to exclude the action: ``action == A`` for
another action, or ``action in [...]`` naming neither the action nor any
group it belongs to. Anything else (no constraint, a form this code does not
know) is kept. Group membership is asked of Cedar itself, with the entity
set that holds the schema's action hierarchy, so it is the hierarchy Cedar
decides with.

Slices keep the policies' ids, so reasons and errors name them as the full
set would.

Each slice is a parsed policy set of its own, which costs memory, so the
tools' actions share slices in buckets of ``BUCKET`` actions: a bucket's
slice holds every policy that may apply to any of its actions. A policy
that cannot apply to the action decided is still harmless in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import cedarpy
from cedarpy import pst

from broker.policy.approval_reads import reads_approval
from broker.policy.schema import cedar_string

ACTION = "Action"
# Actions per shared slice: a decision then weighs the rules for every tool
# plus those of up to this many tools.
BUCKET = 32


class Slices:
    """The policy set cut down per action, cut once and kept."""

    def __init__(
        self,
        policies: cedarpy.PolicySet,
        entities: cedarpy.Entities,
        actions: Iterable[str] = (),
    ):
        """``actions`` are shared out in buckets; any other has its own slice."""
        self._full = policies
        self._tree = policies.to_pst()
        self._entities = entities
        # Templates are instantiated by links whose scopes this code does not
        # read; a set that has any is never cut.
        self._cuttable = not self._tree.templates and not self._tree.template_links
        self._groups = sorted(
            {uid for p in self._tree.static_policies.values() for uid in _in(p)}
        )
        self._probe = _probe_set(self._groups)
        self._by_action: dict[str, cedarpy.PolicySet] = {}
        # The ids each action's slice keeps, and those that read approval.
        self._kept_of: dict[str, frozenset[str]] = {}
        self._readers = frozenset(
            pid for pid, p in self._tree.static_policies.items() if reads_approval(p)
        )
        self._by_ids: dict[frozenset[str], cedarpy.PolicySet] = {}
        ordered = sorted(set(actions))
        self._bucket_of = {
            action: tuple(ordered[start : start + BUCKET])
            for start in range(0, len(ordered), BUCKET)
            for action in ordered[start : start + BUCKET]
        }

    def for_action(self, action: str) -> cedarpy.PolicySet:
        """The policies that can apply to ``Action::"<action>"``."""
        cut = self._by_action.get(action)
        if cut is None:
            bucket = self._bucket_of.get(action, (action,))
            kept = self._kept(bucket)
            cut = self._slice(kept)
            for member in bucket:
                self._by_action[member] = cut
                self._kept_of[member] = kept
        return cut

    def approval_may_change(self, action: str, reasons: Iterable[str]) -> bool:
        """Could granting approval turn this denial of ``action`` around?

        ``reasons`` are the ids of the forbids that denied it. One of them
        that does not read approval denies with approval too; with none, only
        a permit that reads approval could now be satisfied.
        """
        if not self._cuttable:
            return True  # templates and links are not read here
        self.for_action(action)
        denying = frozenset(reasons)
        if denying - self._readers:
            return False
        if denying:
            return True
        kept = self._kept_of[action] & self._readers
        return any(self._tree.static_policies[p].effect == "permit" for p in kept)

    def _kept(self, actions: Iterable[str]) -> frozenset[str]:
        """The ids of the policies that may apply to any of ``actions``."""
        if not self._cuttable:
            return frozenset(self._tree.static_policies)
        scopes = [{action} | self._groups_of(action) for action in actions]
        return frozenset(
            pid
            for pid, policy in self._tree.static_policies.items()
            if any(_may_apply(policy.action, within) for within in scopes)
        )

    def _slice(self, kept: frozenset[str]) -> cedarpy.PolicySet:
        if not self._cuttable or len(kept) == len(self._tree.static_policies):
            return self._full
        cut = self._by_ids.get(kept)
        if cut is None:
            statics = {p: self._tree.static_policies[p] for p in sorted(kept)}
            tree = dataclasses.replace(self._tree, static_policies=statics)
            cut = cedarpy.PolicySet.from_pst(tree)
            self._by_ids[kept] = cut
        return cut

    def _groups_of(self, action: str) -> set[str]:
        """Which of the actions named in ``action in`` scopes contain ``action``."""
        if not self._groups:
            return set()
        request = {
            "principal": {"type": "Slice", "id": "probe"},
            "action": {"type": ACTION, "id": action},
            "resource": {"type": "Slice", "id": "probe"},
            "context": {},
        }
        result = cedarpy.is_authorized(request, self._probe, self._entities)
        if result.diagnostics.errors:
            # Membership unknown: claim every group, so nothing is cut.
            return set(self._groups)
        reasons = result.diagnostics.reasons
        return {self._groups[int(r.removeprefix("policy"))] for r in reasons}


def _in(policy: pst.Template) -> Iterable[str]:
    scope = policy.action
    if isinstance(scope, pst.ActionIn):
        return (uid.id for uid in scope.entities if _plain_action(uid))
    return ()


def _may_apply(scope: object, within: set[str]) -> bool:
    if isinstance(scope, pst.ActionEq):
        return not _plain_action(scope.entity) or scope.entity.id in within
    if isinstance(scope, pst.ActionIn):
        return any(not _plain_action(uid) or uid.id in within for uid in scope.entities)
    return True  # unconstrained, or a form not known here: kept


def _plain_action(uid: pst.EntityUid) -> bool:
    return uid.type.basename == ACTION and not uid.type.namespace


def _probe_set(groups: list[str]) -> cedarpy.PolicySet:
    """One policy per group, ``policy<i>`` matching actions in group ``i``."""
    text = "\n".join(
        f"permit (principal, action in Action::{cedar_string(group)}, resource);"
        for group in groups
    )
    return cedarpy.PolicySet.from_str(text)
