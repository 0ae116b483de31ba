"""Reimbursement documents: the multipart upload (limits, types told by their bytes),
content-addressed storage, and the automatic checks an auditor sees."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from issuer.errors import ApiError
from issuer.identity import name_ref
from issuer.model import CheckResult, DocumentMeta
from issuer.products import is_appliance

MAX_PARTS = 24
MAX_PART_BYTES = 5 * 1024 * 1024
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
REQUIRED = ("confirmation", "invoice", "payment_proof", "photo")
KINDS = frozenset({*REQUIRED, "energy_label"})
META = msgspec.json.Decoder(DocumentMeta)
# what a file's first bytes say it is; anything else is refused
MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"%PDF-", "application/pdf"),
)
MAGIC_TYPES = (*(t for _, t in MAGIC), "image/webp")  # every type `sniff` can tell


@dataclass(frozen=True)
class Part:
    kind: str
    data: bytes
    content_type: str  # from the bytes, never from the part's header
    sha256: str


def sniff(data: bytes) -> str | None:
    for magic, content_type in MAGIC:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def parse_upload(content_type: str, raw: bytes) -> tuple[DocumentMeta, list[Part]]:
    """The meta and the files of a multipart/form-data body; INVALID_REQUEST for anything
    malformed, too big, of an unknown part name or of a type we do not take."""
    if (
        not content_type.lower().startswith("multipart/form-data")
        or "boundary=" not in content_type
    ):
        raise ApiError("INVALID_REQUEST", "body: multipart/form-data with a boundary expected")
    if len(raw) > MAX_UPLOAD_BYTES:
        raise ApiError("INVALID_REQUEST", f"body: over {MAX_UPLOAD_BYTES} bytes")
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
    if not message.is_multipart() or message.defects:
        raise ApiError("INVALID_REQUEST", "body: malformed multipart")
    sections = list(message.iter_parts())
    if not sections or len(sections) > MAX_PARTS:
        raise ApiError("INVALID_REQUEST", f"body: 1 to {MAX_PARTS} parts expected")
    meta: DocumentMeta | None = None
    parts: list[Part] = []
    for section in sections:
        name = section.get_param("name", header="content-disposition")
        data = section.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(data, bytes) or section.defects:
            raise ApiError("INVALID_REQUEST", "body: a part without a name or content")
        if len(data) > MAX_PART_BYTES:
            raise ApiError("INVALID_REQUEST", f"{name}: over {MAX_PART_BYTES} bytes")
        if name == "meta":
            if meta is not None:
                raise ApiError("INVALID_REQUEST", "meta: given twice")
            try:
                meta = META.decode(data)
            except msgspec.DecodeError as exc:
                raise ApiError("INVALID_REQUEST", f"meta: {exc}") from None
            continue
        if name not in KINDS:
            raise ApiError("INVALID_REQUEST", f"{name}: not a document part ({sorted(KINDS)})")
        kind = sniff(data)
        if kind is None:
            raise ApiError("INVALID_REQUEST", f"{name}: not a JPEG, PNG, WebP or PDF file")
        parts.append(Part(name, data, kind, hashlib.sha256(data).hexdigest()))
    if meta is None:
        raise ApiError("INVALID_REQUEST", "meta: required")
    return meta, parts


class DocumentStore(Protocol):
    """Where uploaded files live, by their SHA-256; an S3-compatible store can do this."""

    def put(self, sha256: str, data: bytes) -> None: ...

    def get(self, sha256: str) -> bytes: ...


class LocalStore:
    """Files under a directory, `ab/abcdef…`; written atomically, each content once."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, sha256: str, data: bytes) -> None:
        path = self._path(sha256)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def get(self, sha256: str) -> bytes:
        return self._path(sha256).read_bytes()


@dataclass(frozen=True)
class Facts:
    """What the checks compare the papers with."""

    order_amount_fen: int
    gb_codes: list[str]  # of the redemption's appliance items
    appliances: int
    buyer_name_ref: str | None  # the registered person's, None if never registered
    deadline_ms: int | None
    submitted_ms: int


def appliance_codes(items: list[tuple[str, str | None]]) -> list[str]:
    """Product codes of the appliance items among (category, gb_code) pairs."""
    return sorted(code or "" for category, code in items if is_appliance(category))


def run_checks(
    meta: DocumentMeta, parts: list[Part], facts: Facts, person_key: bytes
) -> list[CheckResult]:
    kinds = [p.kind for p in parts]
    missing = [k for k in REQUIRED if k not in kinds]
    labels = kinds.count("energy_label")
    buyer = facts.buyer_name_ref
    amounts = (meta.invoice_amount_fen, meta.paid_amount_fen, facts.order_amount_fen)
    late = facts.deadline_ms is not None and facts.submitted_ms > facts.deadline_ms
    return [
        CheckResult(
            name="required_parts",
            passed=not missing,
            detail=f"missing {', '.join(missing)}" if missing else "all present",
        ),
        CheckResult(
            name="energy_labels",
            passed=labels >= facts.appliances,
            detail=f"{labels} energy label(s) for {facts.appliances} appliance item(s)",
        ),
        CheckResult(
            name="buyer_name",
            passed=buyer is not None and name_ref(person_key, meta.invoice_buyer_name) == buyer,
            detail="the person never registered"
            if buyer is None
            else "compared with the registered name (keyed hashes)",
        ),
        CheckResult(
            name="amounts",
            passed=len(set(amounts)) == 1,
            detail="invoice {}, paid {}, order {} fen".format(*amounts),
        ),
        CheckResult(
            name="gb_codes",
            passed=sorted(meta.gb_codes) == facts.gb_codes,
            detail=f"papers {sorted(meta.gb_codes)}, redemption {facts.gb_codes}",
        ),
        CheckResult(
            name="deadline",
            passed=not late,
            detail="no deadline" if facts.deadline_ms is None else "within" if not late else "late",
        ),
    ]
