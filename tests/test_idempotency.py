"""Fingerprints of request bodies (issuer/idempotency.py) never change: a retry of a
request made before an upgrade is compared with the fingerprint stored then."""

from __future__ import annotations

import msgspec

from issuer.idempotency import fingerprint
from issuer.model import ClaimIn

CLAIM = (
    b'{"request_id":"req-00000001","user_id":"u1","person_ref":"' + b"ab" * 32 + b'",'
    b'"location":{"region_code":"141029"},"device_id":"d1"}'
)


def test_fingerprints_are_those_stored_before() -> None:
    # the values of blake2b(JSON, digest_size=12) as every release so far computed them
    assert fingerprint(msgspec.json.decode(CLAIM, type=ClaimIn)) == "3ac31bce460b5b5bca09674a"
    assert fingerprint({"a": 1}) == "abd04f5426c58fe48d04555e"
    assert fingerprint({"a": 1}) == fingerprint({"a": 1})  # the digest is not left shared
