"""Looking after the record at start-up: check the chain, prune what expired.

A broken chain is logged loudly at start and the broker keeps serving: the
calls it mediates are still decided and recorded, and stopping would only
hide the record from the people who need to look at it. Pruning waits until
the chain verifies, since it could otherwise remove the evidence of a break.
"""

from __future__ import annotations

import logging

from broker.audit import Store
from broker.chain import Checkpoint, Verification, describe
from broker.errors import RecordFailed

log = logging.getLogger("broker.audit")

DAY_SECONDS = 86_400.0


def cutoff(retention_days: int, now: float) -> float:
    """The time before which entries have outlived ``retention_days``."""
    return now - retention_days * DAY_SECONDS


def check_at_start(
    store: Store, retention_days: int | None, *, now: float
) -> Verification | None:
    """Verify the chain and, if it holds, prune; None if the store cannot be read."""
    try:
        verification = store.verify()
    except RecordFailed as exc:
        log.error("audit chain not checked at start: %s", exc.detail)
        return None
    if not verification.intact:
        log.error(
            "AUDIT RECORD TAMPERED OR DAMAGED: %s. The broker keeps serving and "
            "recording; run `broker audit verify` and investigate.",
            describe(verification),
        )
        if retention_days is not None:
            log.error("retention pruning skipped while the chain is broken")
        return verification
    log.info("audit %s", describe(verification))
    if retention_days is not None:
        prune_expired(store, retention_days, now=now)
    return verification


def prune_expired(
    store: Store, retention_days: int, *, now: float
) -> Checkpoint | None:
    """Prune entries older than ``retention_days``, logging what went."""
    try:
        checkpoint = store.prune(cutoff(retention_days, now), now=now)
    except RecordFailed as exc:
        log.error("audit retention pruning failed: %s", exc.detail)
        return None
    if checkpoint is not None:
        log.info(
            "audit pruned %d entries older than %d days, through #%d",
            checkpoint.pruned,
            retention_days,
            checkpoint.through_seq,
        )
    return checkpoint
