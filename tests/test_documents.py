"""The document upload's parser and automatic checks, without servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from issuer.documents import Facts, LocalStore, Part, parse_upload, run_checks, sniff
from issuer.errors import ApiError
from issuer.identity import name_ref
from issuer.model import DocumentMeta
from tests.test_settlement import JPEG, PDF, PNG, body_of

pytestmark = pytest.mark.fast

KEY = b"person-key"
META = DocumentMeta(
    invoice_no="1",
    invoice_buyer_name="王 小明",
    invoice_amount_fen=500_000,
    paid_amount_fen=500_000,
    gb_codes=["6901234567892"],
)
ALL_PARTS = [
    Part(kind, b"", "application/pdf", "0" * 64)
    for kind in ("confirmation", "invoice", "payment_proof", "photo", "energy_label")
]


def facts(**overrides: object) -> Facts:
    values: dict[str, object] = {
        "order_amount_fen": 500_000,
        "gb_codes": ["6901234567892"],
        "appliances": 1,
        "buyer_name_ref": name_ref(KEY, "王小明"),
        "deadline_ms": 2_000,
        "submitted_ms": 1_000,
    }
    values.update(overrides)
    return Facts(**values)  # type: ignore[arg-type]


def failed(meta: DocumentMeta, parts: list[Part], f: Facts) -> set[str]:
    return {c.name for c in run_checks(meta, parts, f, KEY) if not c.passed}


def test_types_come_from_the_bytes() -> None:
    assert sniff(PNG) == "image/png" and sniff(JPEG) == "image/jpeg"
    assert sniff(PDF) == "application/pdf"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(b"<html>") is None and sniff(b"") is None


def test_a_full_upload_parses() -> None:
    raw, content_type = body_of(
        [("invoice", PDF), ("photo", PNG), ("photo", JPEG)],
        {
            "invoice_no": "1",
            "invoice_buyer_name": "x",
            "invoice_amount_fen": 1,
            "paid_amount_fen": 1,
        },
    )
    meta, parts = parse_upload(content_type, raw)
    assert meta.gb_codes == [] and [p.kind for p in parts] == ["invoice", "photo", "photo"]
    assert parts[1].data == PNG and parts[1].content_type == "image/png"


@pytest.mark.parametrize(
    "parts",
    [[("meta", b"{}"), ("meta", b"{}")], [("photo", b"GIF89a")], [("x", PNG)], []],
)
def test_bad_parts_are_refused(parts: list[tuple[str, bytes]]) -> None:
    raw, content_type = body_of(parts, None)
    with pytest.raises(ApiError) as err:
        parse_upload(content_type, raw)
    assert err.value.code == "INVALID_REQUEST"


def test_checks_pass_on_good_papers_and_name_each_problem() -> None:
    assert failed(META, ALL_PARTS, facts()) == set()  # the name matches despite the space
    assert failed(META, ALL_PARTS, facts(buyer_name_ref=None)) == {"buyer_name"}
    assert failed(META, ALL_PARTS[:3], facts()) == {"required_parts", "energy_labels"}
    assert failed(META, ALL_PARTS, facts(appliances=2)) == {"energy_labels"}
    assert failed(META, ALL_PARTS, facts(order_amount_fen=499_999)) == {"amounts"}
    assert failed(META, ALL_PARTS, facts(gb_codes=["6901234567885"])) == {"gb_codes"}
    assert failed(META, ALL_PARTS, facts(submitted_ms=2_001)) == {"deadline"}
    assert failed(META, ALL_PARTS, facts(deadline_ms=None, submitted_ms=10**13)) == set()


def test_local_store_keeps_each_content_once(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("ab" + "0" * 62, b"one")
    store.put("ab" + "0" * 62, b"one")
    assert store.get("ab" + "0" * 62) == b"one"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["ab" + "0" * 62]
