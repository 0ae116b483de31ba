"""The append-only audit log: who did what to which record, when and why."""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

ENCODE = msgspec.json.Encoder()


async def audit(
    conn: asyncpg.Connection, actor: str, action: str, subject: str, reason: str, **details: Any
) -> None:
    await conn.execute(
        "INSERT INTO audit_log (actor, action, subject, reason, details)"
        " VALUES ($1, $2, $3, $4, $5::jsonb)",
        actor,
        action,
        subject,
        reason,
        ENCODE.encode(details).decode(),
    )
