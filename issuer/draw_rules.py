"""The rules of a lottery draw, as API.md publishes them: an application's ref, the root
of a round's list, each rank, the seed's commitment, and the check of a published draw
document against them. Pure: no Redis and no clock, so anyone can check a draw.

An application is published as its `application_ref`, a keyed hash that identifies no one
without the key. The list's digest `applications_root` is fixed when applications close;
each rank is SHA-256(seed ‖ root ‖ ref), so whoever knows the seed still cannot predict
the outcome before the list is closed. Winners are the lowest ranks.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import Counter
from collections.abc import Iterable
from typing import Annotated, Literal

from msgspec import Meta, Struct

from issuer.model import Sha256Hex

# the secret ops reveal at the draw: 16 to 64 bytes as lowercase hex
Seed = Annotated[str, Meta(pattern=r"^(?:[0-9a-f]{2}){16,64}$")]
Outcome = Literal["won", "not_drawn"]


class DrawEntry(Struct, kw_only=True):
    application_ref: str
    rank: Sha256Hex | None = None  # once the seed is revealed
    outcome: Outcome | None = None


class DrawDocument(Struct, kw_only=True):
    """`GET /v1/campaigns/{id}/rounds/{round_id}/draw`: everything the draw is checked from."""

    campaign_id: str
    round_id: str
    commitment: Sha256Hex
    seed: Seed | None = None  # None until revealed
    applications_root: Sha256Hex | None = None  # None until applications close
    quota: int | None = None  # the round's, None if money alone limits it
    winners: int | None = None
    applications: list[DrawEntry]


def application_ref(key: bytes, application_id: str) -> str:
    """The published name of an application: hex HMAC-SHA256 of its id under `key`."""
    return hmac.new(key, application_id.encode(), hashlib.sha256).hexdigest()


def applications_root(refs: Iterable[str]) -> str:
    """Hex SHA-256 of the refs sorted ascending, joined by newlines, UTF-8."""
    return hashlib.sha256("\n".join(sorted(refs)).encode()).hexdigest()


def rank(seed_hex: str, root_hex: str, ref: str) -> str:
    """Hex SHA-256 of the seed's bytes, the root's bytes and the ref in UTF-8."""
    return hashlib.sha256(
        bytes.fromhex(seed_hex) + bytes.fromhex(root_hex) + ref.encode()
    ).hexdigest()


def commits(seed_hex: str, commitment: str) -> bool:
    """True if the SHA-256 of the seed's bytes is `commitment`; False for a seed not hex."""
    try:
        seed = bytes.fromhex(seed_hex)
    except ValueError:
        return False
    return hashlib.sha256(seed).hexdigest() == commitment


def order(seed_hex: str, root_hex: str, refs: Iterable[str]) -> list[str]:
    """The refs in ascending rank: the order in which winners are taken."""
    return sorted(refs, key=lambda ref: rank(seed_hex, root_hex, ref))


def verify(doc: DrawDocument) -> list[str]:
    """Every way the document differs from the draw it recomputes; empty when it checks."""
    refs = [e.application_ref for e in doc.applications]
    problems = [f"application_ref {r} appears {n} times" for r, n in Counter(refs).items() if n > 1]
    root = applications_root(refs)
    if doc.applications_root is None:
        problems.append("no applications_root: applications have not closed")
    elif doc.applications_root != root:
        problems.append(
            f"applications_root {doc.applications_root} differs from {root}, the root of the"
            " listed applications: one was changed, added or removed"
        )
    if doc.seed is None:
        problems.append("no seed: the draw has not been revealed")
    elif not commits(doc.seed, doc.commitment):
        problems.append(f"seed {doc.seed} does not match commitment {doc.commitment}")
    if doc.seed is None or doc.applications_root is None:
        return problems
    return problems + _outcomes(doc, doc.seed, doc.applications_root)


def _outcomes(doc: DrawDocument, seed: str, root: str) -> list[str]:
    """Problems with the ranks and outcomes, recomputed from `seed` and the published root."""
    problems = []
    ranks = {}
    for e in doc.applications:
        ranks[e.application_ref] = expected = rank(seed, root, e.application_ref)
        if e.rank != expected:
            problems.append(
                f"application {e.application_ref}: rank {e.rank}, recomputed {expected}"
            )
        if e.outcome is None:
            problems.append(f"application {e.application_ref}: no outcome")
    won = [e.application_ref for e in doc.applications if e.outcome == "won"]
    lost = [e.application_ref for e in doc.applications if e.outcome == "not_drawn"]
    if won and lost:
        last_won = max(won, key=ranks.__getitem__)
        first_lost = min(lost, key=ranks.__getitem__)
        if ranks[first_lost] < ranks[last_won]:
            problems.append(
                f"winners are not the lowest ranks: {last_won} won but ranks after"
                f" {first_lost}, not drawn"
            )
    if doc.winners is not None and len(won) != doc.winners:
        problems.append(f"{len(won)} applications won, the document says {doc.winners}")
    if doc.quota is not None and len(won) > doc.quota:
        problems.append(f"{len(won)} applications won, more than the quota of {doc.quota}")
    return problems
