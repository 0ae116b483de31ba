"""Consumer registration: the person's keyed references, never the ID number or name."""

from __future__ import annotations

import base64
import os

import msgspec

from issuer import idempotency
from issuer.campaigns import Campaigns
from issuer.errors import ApiError
from issuer.identity import name_ref, person_ref, phone_ref
from issuer.model import RegistrationIn, RegistrationOut
from issuer.protocol import Register
from issuer.scripts import Scripts


class RegistrationRecord(msgspec.Struct, kw_only=True):
    registration_id: str
    person_ref: str
    user_id: str
    name_ref: str  # compared with the invoice buyer's name at settlement
    phone_ref: str
    registered_at: int | None = None


REGISTRATION = msgspec.json.Decoder(RegistrationRecord)
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
    registration = Register(
        request=idempotency.request(ck, now_s, key_id, body.request_id, canonical),
        ledger=ck.ledger,
        registrations=ck.registrations,
        events=ck.events,
        person_ref=ref,
        registration=ENCODE.encode(record),
    )
    answer = await idempotency.write(
        scripts, registration, accept=(*idempotency.OK_OR_REPLAY, "EXISTING")
    )
    stored = REGISTRATION.decode(answer.payload[0])
    return RegistrationOut(registration_id=stored.registration_id, person_ref=ref), answer.code
