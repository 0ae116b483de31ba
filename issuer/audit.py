"""The append-only audit log: who did what to which record, when and why, and in which
tenant."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from issuer.auth import ApiKey

ENCODE = msgspec.json.Encoder()


async def audit(
    conn: asyncpg.Connection,
    actor: ApiKey | str,
    action: str,
    subject: str,
    reason: str,
    *,
    tenant: str,
    **details: Any,
) -> None:
    """One entry. `actor`: the key that acted (its id, and the tenants it is scoped to as
    `key_tenants`: null for a platform-wide key) or the name of a process; `tenant`: the
    tenant of the record acted on."""
    if isinstance(actor, ApiKey):
        details["key_tenants"] = None if actor.tenants is None else sorted(actor.tenants)
        actor = actor.id
    await conn.execute(
        "INSERT INTO audit_log (actor, action, subject, reason, details, tenant)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6)",
        actor,
        action,
        subject,
        reason,
        ENCODE.encode(details).decode(),
        tenant,
    )
