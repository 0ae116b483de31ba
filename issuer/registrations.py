"""Consumer registration: the person's keyed references, never the ID number or name."""

from __future__ import annotations

import base64
import os

import msgspec

from issuer.campaigns import Campaigns, fingerprint, idem_field
from issuer.errors import ApiError
from issuer.identity import name_ref, person_ref, phone_ref
from issuer.keys import IDEMPOTENCY_BUCKET_S
from issuer.model import RegistrationIn, RegistrationOut
from issuer.scripts import Scripts


class RegistrationRecord(msgspec.Struct, kw_only=True):
    registration_id: str
    person_ref: str
    user_id: str
    name_ref: str  # compared with the invoice buyer's name at settlement
    phone_ref: str
    registered_at: int | None = None


RECORD = msgspec.json.Decoder(RegistrationRecord)
ENCODE = msgspec.json.Encoder()


async def register(
    scripts: Scripts,
    campaigns: Campaigns,
    person_key: bytes,
    campaign_id: str,
    body: RegistrationIn,
    key_id: str,
    now_s: float,
) -> tuple[RegistrationOut, str]:
    """Register; returns (registration, OK | REPLAY | EXISTING). A person registers once
    per campaign: registering again returns the first registration."""
    try:
        ref = person_ref(person_key, body.person.id_number)
        record = RegistrationRecord(
            registration_id="r-" + base64.b32encode(os.urandom(10)).decode().lower(),
            person_ref=ref,
            user_id=body.user_id,
            name_ref=name_ref(person_key, body.person.name),
            phone_ref=phone_ref(person_key, body.person.phone),
        )
    except ValueError as exc:
        raise ApiError("INVALID_REQUEST", f"person: {exc}") from None
    ck = (await campaigns.cached(campaign_id)).keys
    canonical = (body.request_id, body.user_id, ref, record.name_ref, record.phone_ref)
    cur, prev = ck.idempotency(now_s)
    code, payload = await scripts.run(
        "register",
        [ck.ledger, ck.registrations, ck.events, cur, prev],
        [
            idem_field(key_id, body.request_id),
            fingerprint(canonical),
            IDEMPOTENCY_BUCKET_S * 2,
            ref,
            ENCODE.encode(record),
        ],
    )
    code = code.decode()
    if code not in ("OK", "EXISTING", "REPLAY"):
        raise ApiError(code)
    stored = RECORD.decode(payload)
    return RegistrationOut(registration_id=stored.registration_id, person_ref=ref), code
