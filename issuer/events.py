"""The entries of the event streams as the scripts of lua/ write them, and the events each
holds.

An entry has its type `t` and its document `d` (JSON); some types carry more fields, merged
into the document (`version`, `budget`, `status`). An entry whose `d` is a JSON array
holds one event of its type per element, in order: lib.lua's gathered writer puts the
vouchers a claim batch issued in one `t=claim` entry. Each of those events is recorded on
its own in PostgreSQL (store.events_of_entries), its id the entry's id and its place
(`<ms>-<seq>-<i>`, from 0); an entry of one document keeps the entry's id (`<ms>-<seq>`).
So a stream written before entries were gathered reads the same way, and an older flusher
that meets an array refuses it (its voucher row has no id) rather than recording it
without its vouchers.
"""

from __future__ import annotations

from typing import Any

import msgspec

Fields = dict[bytes, bytes]
_DOCUMENT = msgspec.json.Decoder(dict[str, Any])


def entry_data(fields: Fields) -> str:
    """The entry's JSON document: `d` with the entry's other fields merged in (a gathered
    entry has none: its array as is)."""
    data = fields[b"d"]
    if len(fields) == 2:  # `t` and `d` only (claims, redemptions...): the document as is
        return data.decode()
    extra = {k.decode(): v.decode() for k, v in fields.items() if k not in (b"t", b"d")}
    if not extra:
        return data.decode()
    doc = _DOCUMENT.decode(data)
    doc.update({k: int(v) if v.lstrip("-").isdigit() else v for k, v in extra.items()})
    return msgspec.json.encode(doc).decode()


def decoded_events(fields: Fields) -> list[tuple[str, dict[str, Any]]]:
    """(type, document) of each event the entry holds, in order (`d` only: the fields merged
    by entry_data are left out)."""
    kind = fields[b"t"].decode()
    data = msgspec.json.decode(fields[b"d"])
    return [(kind, doc) for doc in data] if isinstance(data, list) else [(kind, data)]
