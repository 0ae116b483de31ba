"""Structured logs: one JSON object per line on stderr. Never log an ID number, name or phone:
handlers only ever pass person references."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from math import floor
from typing import BinaryIO

import msgspec

# attributes every LogRecord has; anything else was passed with `extra=` and is logged
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}
_ENCODE = msgspec.json.Encoder(enc_hook=str)
BATCH_S = 0.05  # longest time a batched line waits to be written
_stream: list[BinaryIO] = []  # where setup() sends the batched lines (stderr's bytes)
_batch: list[Line] = []
_writing: list[asyncio.TimerHandle] = []
_second: list[tuple[int, str]] = [(-1, "")]  # the last second formatted, and its text
_MILLIS = tuple(f".{n:03d}Z" for n in range(1000))  # a timestamp's tail, by millisecond
# the standard levels' names, looked up with no call (`logging.getLevelName` is a frame)
LEVEL_NAMES = {n: logging.getLevelName(n) for n in (logging.DEBUG, logging.INFO, logging.WARNING)}
# the lowest level a request line is made at: the root logger's, once setup() set it (it
# is not changed later), compared with no call (`Logger.isEnabledFor` is a frame); before
# setup (a test) any level, logging filtering as usual (`batched`)
lowest = [logging.NOTSET]


def timestamp(created: float) -> str:
    """UTC, to the millisecond; the date and time of day are formatted once a second (a
    formatting per request line cost more than the rest of the line), the milliseconds
    looked up. `math.floor`, not `int()` (a type call) nor `% 1` (a float's fmod): each
    costs about three times as much."""
    millis = floor(created * 1000)
    whole = millis // 1000
    second, text = _second[0]
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second[0] = (whole, text)
    return text + _MILLIS[millis % 1000]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return _ENCODE.encode(doc).decode("utf-8", "replace")


class Line(msgspec.Struct, rename={"head": "level"}, gc=False):
    """A batched log line in JsonFormatter's shape: `ts` as `timestamp` writes the time it
    is made, then `head` (`head()`: its level, logger and message, the same for every line
    of a kind, as ready-made JSON, encoded once per kind: ~160 instructions per line each
    otherwise), then a subclass's fields in the order they are declared. A Struct, not a
    dict: made and encoded without a dictionary per line, and its keys kept in their order;
    made whole by position (by keyword: twice the cost; a field set afterwards: a fifth of
    it more, each). Not tracked by the garbage collector (`gc=False`: no header, no
    tracking when made nor untracking when freed): a line holds strings, numbers and lists
    of strings, never itself nor anything that could hold it."""

    ts: str
    head: msgspec.Raw


_LEVEL_KEY = b'{"level":'


def head(level: int, logger: str, msg: str) -> msgspec.Raw:
    """A `Line`'s head: `msg` logged by `logger` at `level` (as LEVEL_NAMES names it), as
    the JSON written after the key "level" (its value, then the other two fields)."""
    doc = {"level": LEVEL_NAMES[level], "logger": logger, "msg": msg}
    return msgspec.Raw(_ENCODE.encode(doc)[len(_LEVEL_KEY) : -1])


def batched(line: Line) -> None:
    """The line's `msg` logged by its `logger` at its `level` with its other fields as
    `extra`, as the same JSON line, written with the lines of the next BATCH_S in one
    encode and one write: the per-request log of the hot path, where a logging call each
    (record, formatter, write) costs more than the request."""
    if not _stream:  # logging not set up here (a test): the usual way, its head read back
        extra = msgspec.json.decode(_ENCODE.encode(line))
        del extra["ts"]
        level = logging.getLevelNamesMapping()[extra.pop("level")]
        logging.getLogger(extra.pop("logger")).log(level, extra.pop("msg"), extra=extra)
        return
    _batch.append(line)
    if not _writing:
        try:
            _writing.append(asyncio.get_running_loop().call_later(BATCH_S, write_batch))
        except RuntimeError:  # no event loop: at once
            write_batch()


def write_batch() -> None:
    """Write the batched lines now (also at shutdown, so that none is lost): their UTF-8
    as encoded, to stderr's bytes (decoded to text, stderr's text layer encoded it back: a
    copy each way per line). The formatter's records are flushed as written, so the text
    layer holds none that a batch could overtake."""
    for handle in _writing:
        handle.cancel()
    _writing.clear()
    if _batch and _stream:
        _stream[0].write(_ENCODE.encode_lines(_batch))
        _stream[0].flush()
    _batch.clear()


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    lowest[0] = root.level
    _stream[:] = [sys.stderr.buffer]
