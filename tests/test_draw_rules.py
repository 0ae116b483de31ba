"""The draw's rules: lottery rounds' validation, and the draw recomputed from its published
document."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import msgspec
import pytest

from issuer.cli import main
from issuer.draw_rules import (
    DrawDocument,
    DrawEntry,
    application_ref,
    applications_root,
    commits,
    order,
    rank,
    verify,
)
from issuer.model import CampaignDef, Round
from issuer.schedule import expand_rounds

pytestmark = pytest.mark.fast

KEY = b"application-ref key of the test"
SEED = "5eed" * 16
OTHER_SEED = "0dd5" * 16
COMMITMENT = hashlib.sha256(bytes.fromhex(SEED)).hexdigest()


def refs(count: int) -> list[str]:
    return [application_ref(KEY, f"app-{i}") for i in range(count)]


def document(applications: list[str], seed: str = SEED, quota: int = 3) -> DrawDocument:
    """The document of a draw done right: the `quota` lowest ranks win."""
    root = applications_root(applications)
    won = set(order(seed, root, applications)[:quota])
    return DrawDocument(
        campaign_id="c1",
        round_id="r1",
        commitment=hashlib.sha256(bytes.fromhex(seed)).hexdigest(),
        seed=seed,
        applications_root=root,
        quota=quota,
        winners=len(won),
        applications=[
            DrawEntry(
                application_ref=ref,
                rank=rank(seed, root, ref),
                outcome="won" if ref in won else "not_drawn",
            )
            for ref in applications
        ],
    )


def winners(doc: DrawDocument) -> set[str]:
    return {e.application_ref for e in doc.applications if e.outcome == "won"}


# ---------------------------------------------------------------- the hashes


def test_hashes_are_as_api_md_defines_them() -> None:
    assert applications_root(["b", "a"]) == hashlib.sha256(b"a\nb").hexdigest()
    root = applications_root(["a"])
    expected = hashlib.sha256(bytes.fromhex(SEED) + bytes.fromhex(root) + b"a").hexdigest()
    assert rank(SEED, root, "a") == expected
    assert order(SEED, root, ["a", "b", "c"]) == sorted("abc", key=lambda r: rank(SEED, root, r))


def test_application_ref_is_a_keyed_hash() -> None:
    ref = application_ref(KEY, "app-1")
    assert len(ref) == 64 and int(ref, 16) >= 0
    assert ref == application_ref(KEY, "app-1")
    assert ref != application_ref(b"another key", "app-1")
    assert ref != hashlib.sha256(b"app-1").hexdigest()


def test_commits() -> None:
    assert commits(SEED, COMMITMENT)
    assert not commits(OTHER_SEED, COMMITMENT)
    assert not commits("not hex", COMMITMENT)


# ---------------------------------------------------------------- verify


def test_draw_is_reproducible_from_its_document() -> None:
    doc = msgspec.json.decode(msgspec.json.encode(document(refs(20))), type=DrawDocument)
    assert verify(doc) == []
    assert doc.applications_root is not None and doc.seed is not None
    listed = [e.application_ref for e in doc.applications]
    assert winners(doc) == set(order(doc.seed, doc.applications_root, listed)[:3])


def test_another_seed_gives_other_winners() -> None:
    applications = refs(50)
    assert winners(document(applications)) != winners(document(applications, OTHER_SEED))


@pytest.mark.parametrize(
    "change",
    [
        lambda apps: apps.__setitem__(4, DrawEntry(application_ref="f" * 64, rank="0" * 64)),
        lambda apps: apps.append(DrawEntry(application_ref="e" * 64, outcome="not_drawn")),
        lambda apps: apps.pop(7),
    ],
    ids=["changed", "added", "removed"],
)
def test_a_changed_list_is_detected(change: Any) -> None:
    doc = document(refs(10), quota=10)  # every application wins: the winners stay a prefix
    change(doc.applications)
    problems = verify(doc)
    assert any("one was changed, added or removed" in p for p in problems), problems


def test_a_wrong_seed_fails_the_commitment() -> None:
    doc = document(refs(10), seed=OTHER_SEED)
    doc.commitment = COMMITMENT  # a draw redone with another seed than the committed one
    assert verify(doc) == [f"seed {OTHER_SEED} does not match commitment {COMMITMENT}"]


def test_winners_must_be_the_lowest_ranks() -> None:
    doc = document(refs(10))
    assert doc.seed is not None and doc.applications_root is not None
    ranked = order(doc.seed, doc.applications_root, [e.application_ref for e in doc.applications])
    entries = {e.application_ref: e for e in doc.applications}
    entries[ranked[2]].outcome, entries[ranked[3]].outcome = "not_drawn", "won"
    [problem] = verify(doc)
    assert problem.startswith(f"winners are not the lowest ranks: {ranked[3]} won")


def test_a_wrong_rank_is_reported() -> None:
    doc = document(refs(5))
    doc.applications[1].rank = "0" * 64
    [problem] = verify(doc)
    assert problem.startswith(f"application {doc.applications[1].application_ref}: rank 000")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("winners", 4, "3 applications won, the document says 4"),
        ("quota", 2, "3 applications won, more than the quota of 2"),
        ("seed", None, "no seed: the draw has not been revealed"),
        ("applications_root", None, "no applications_root: applications have not closed"),
    ],
)
def test_counts_and_missing_parts(field: str, value: object, message: str) -> None:
    doc = document(refs(10))
    setattr(doc, field, value)
    assert verify(doc) == [message]


def test_repeated_application_and_missing_outcome() -> None:
    applications = refs(4)
    doc = document([*applications, applications[0]], quota=5)
    doc.applications[1].outcome = None
    problems = verify(doc)
    assert f"application_ref {applications[0]} appears 2 times" in problems
    assert f"application {applications[1]}: no outcome" in problems


# ---------------------------------------------------------------- issuer verify-draw


def write(tmp_path: Path, body: bytes) -> str:
    path = tmp_path / "draw.json"
    path.write_bytes(body)
    return str(path)


def test_cli_passes_a_good_draw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = document(refs(20))
    assert main(["verify-draw", write(tmp_path, msgspec.json.encode(doc))]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"draw of c1/r1 checks: 20 applications, 3 winners, root {doc.applications_root}\n"
    )


def test_cli_reads_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(msgspec.json.encode(document(refs(3)))))
    monkeypatch.setattr("sys.stdin", stdin)
    assert main(["verify-draw", "-"]) == 0


def test_cli_fails_a_tampered_draw(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = document(refs(20))
    doc.applications.pop()
    assert main(["verify-draw", write(tmp_path, msgspec.json.encode(doc))]) == 1
    assert "one was changed, added or removed" in capsys.readouterr().out


@pytest.mark.parametrize("body", [b"{not json", b'{"campaign_id": "c1"}', b"[]", None])
def test_cli_refuses_what_is_not_a_draw(tmp_path: Path, body: bytes | None) -> None:
    path = str(tmp_path / "missing.json") if body is None else write(tmp_path, body)
    assert main(["verify-draw", path]) == 2


# ---------------------------------------------------------------- lottery rounds


OPENS, CLOSES = "2024-06-17T10:00:00+08:00", "2024-06-26T22:00:00+08:00"
APPLIED, DRAWN = "2024-06-20T22:00:00+08:00", "2024-06-21T10:00:00+08:00"
LOTTERY = {
    "allocation": "lottery",
    "applications_close_at": APPLIED,
    "draws_at": DRAWN,
    "commitment": COMMITMENT,
}


def definition(**fields: Any) -> CampaignDef:
    """A campaign with one explicit round, decoded as `PUT /v1/campaigns/{id}` decodes it."""
    spec = {"round_id": "r1", "opens_at": OPENS, "closes_at": CLOSES, "valid_until": CLOSES}
    body = {
        "name": "test",
        "budget_fen": 1_000_000,
        "geofence": {"region_codes": ["1410"]},
        "eligibility": {"categories": ["appliance"]},
        "rounds": [{**spec, **fields}],
    }
    return msgspec.convert(body, CampaignDef)


def rounds(**fields: Any) -> list[Round]:
    """The rounds of that campaign, checked as `PUT /v1/campaigns/{id}` checks them."""
    return expand_rounds(definition(**fields))


def test_a_lottery_round() -> None:
    [rnd] = rounds(**LOTTERY)
    assert rnd.allocation == "lottery" and rnd.commitment == COMMITMENT
    assert rnd.applications_close_at is not None and rnd.draws_at is not None
    assert (rnd.applications_close_at.isoformat(), rnd.draws_at.isoformat()) == (APPLIED, DRAWN)
    assert rounds(**{**LOTTERY, "draws_at": APPLIED})[0].draws_at == rnd.applications_close_at


def test_a_first_come_round_reads_as_before() -> None:
    [rnd] = rounds()
    assert rnd.allocation == "first_come"
    times = f'"opens_at":"{OPENS}","closes_at":"{CLOSES}","valid_until":"{CLOSES}"'
    assert msgspec.json.encode(rnd) == f'{{"round_id":"r1",{times}}}'.encode()
    assert b"allocation" not in msgspec.json.encode(definition())  # the definition as served


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({**LOTTERY, "commitment": None}, "Expected `str`, got `null`"),
        ({**LOTTERY, "commitment": COMMITMENT.upper()}, "Expected `str` matching"),
        ({**LOTTERY, "commitment": "ab"}, "Expected `str` matching"),
        ({**LOTTERY, "allocation": "raffle"}, "Invalid enum value 'raffle'"),
        ({"allocation": "lottery"}, "needs applications_close_at, draws_at, commitment"),
        ({k: v for k, v in LOTTERY.items() if k != "draws_at"}, "needs draws_at$"),
        ({k: v for k, v in LOTTERY.items() if k != "commitment"}, "needs commitment$"),
        ({"draws_at": DRAWN}, "draws_at only apply to allocation = 'lottery'"),
        (
            {**LOTTERY, "allocation": "first_come"},
            "applications_close_at, draws_at, commitment only apply to",
        ),
        ({**LOTTERY, "applications_close_at": OPENS}, "opens_at < applications_close_at <="),
        ({**LOTTERY, "draws_at": OPENS}, "applications_close_at <= draws_at"),
        ({**LOTTERY, "draws_at": CLOSES}, "draws_at < closes_at"),
    ],
)
def test_bad_lottery_rounds(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rounds(**fields)
