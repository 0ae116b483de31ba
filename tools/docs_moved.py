"""Check that moving the README's text into docs/ lost nothing.

    python -m tools.docs_moved [--old FILE]

Every sentence, table row and code line of the old README (default: the README of commit
004099c, the last before the split, read with `git show`) must be found in the README or a
Markdown file under docs/. Both sides are compared after normalising whitespace, case and
Markdown markup (emphasis, code spans, escapes; a link counts as its text, not its target),
so a sentence may move to any file and into any paragraph. A bold lead-in (`**Title**
(modules):` or `**Title.**`) counts as its own units, so it may become a heading.

Words reworded on purpose are listed in REWORDED with the words that replace them: their
sentence must then be found with the replacement; a sentence dropped on purpose is listed in
DROPPED; each with its reason.
Prints what is missing (with its line in the old README) and exits 1 if anything is.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
OLD_REVISION = "004099c"

# words of an old sentence -> (the words that replace them, why)
REWORDED: dict[str, tuple[str, str]] = {
    "(Before 2026-12-03 this README said 10, an arithmetic slip.)": (
        "(Before 2026-12-03 the README said 10, an arithmetic slip.)",
        "the figure now lives in docs/results.md, not in the README",
    ),
    "The claim path's CPU ceilings (Results, Benchmark) are missed, all but shedding": (
        "the claim path's CPU ceilings are missed, all but shedding",
        "the sentence now stands in docs/results.md's Benchmark section, which it named",
    ),
    "issuer_due_date_provisional_soonest_days (read from PostgreSQL": (
        "issuer_due_date_provisional_soonest_seconds (seconds until the soonest begins, read"
        " from PostgreSQL",
        "the gauge was renamed to Prometheus' base unit of time and counts seconds until the"
        " soonest provisional due date begins (issue 20)",
    ),
    "issuer/draw.py, issuer/lottery.py, lua/draw_batch.lua": (
        "issuer/draw_rules.py, issuer/draws.py, lua/draw_batch.lua",
        "the two lottery modules were named for what each holds (issue 21)",
    ),
    "Status: the claim service (campaigns, registration, claims, vouchers, the flusher and"
    " reconciliation), the surge harness (`make surge`: Locust + an invariant verifier), the"
    " money path (redemption at payment, expiry, refunds, clawbacks, round carry-over),"
    " settlement (documents, audit, disbursement) with the government reports, operations"
    " (metrics, JSON logs, the `/ops` page, graceful lifecycle, `issuer rebuild`, `deploy/`)"
    " and the fault and abuse drills (shedding, rate limits, durable acknowledgement, Redis,"
    " PostgreSQL, worker and flusher failures, schemathesis), on one Redis, a Redis/Valkey"
    " Cluster or a Sentinel set, with failover drills, and lottery rounds (摇号) whose draw"
    " anyone can verify from its published document": (
        "Status: the claim service, the money path (redemption at payment, expiry, refunds,"
        " clawbacks, round carry-over), settlement (documents, integrity checks, the"
        " reviewer's desk, disbursement) with the government reports, lottery rounds (摇号)"
        " whose draw anyone can verify from its published document, tenants (many counties"
        " on one service) with scoped keys, and operations (metrics, tested alerts, JSON"
        " logs, the `/ops` page, graceful lifecycle, `issuer rebuild`, `deploy/`, a"
        " container image), on one Redis, a Redis/Valkey Cluster or a Sentinel set; the"
        " surge harness, the fault and failover drills and `make chaos` check them",
        "the status names issues 20-23's work (tenants, the desk, tested alerts, the image,"
        " make chaos) and is shortened to keep the README near 250 lines; the harness and"
        " each drill are described in docs/design/ and docs/results.md",
    ),
    "(about 9 minutes once installed)": (
        "(about 11 minutes: 4½ on two workers, 7 alone)",
        "the suite grew with issues 20-24 (chaos cells, tenants and keys, the desk, the image)"
        " and now runs in two phases, the serial one shortened since; docs/results.md's 'The"
        " whole suite' has the timed runs",
    ),
    "`make run` prints the path of a generated development keys file (one key per role)": (
        "It prints the path of a generated development keys file (one key per role, then one"
        " per role and tenant: `--key-id xiangning-ops`)",
        "make run now loads the seed campaigns as two tenants and writes scoped keys too"
        " (issue 22)",
    ),
    "To try the same on an embedded Valkey Cluster": (
        "To try `make run` on an embedded Valkey Cluster",
        "the paragraph moved to docs/design/topologies.md to keep the README near 250 lines,"
        " where 'the same' no longer follows make run",
    ),
    "API keys (`[[key]] id secret role merchant_id`); generated for development if absent": (
        "API keys (`[[key]] id secret role merchant_id tenants not_before not_after`: the keys"
        " file); read again on SIGHUP and within about a second of a change on disk; a file"
        " that cannot be read stops `issuer serve` at start, and later keeps the old keys;"
        " generated for development if absent",
        "keys carry tenants and a validity, and are reloaded without a restart (issue 22)",
    ),
    "`routes_ops` (campaigns, merchants, the overview)": (
        "`routes_review` (the reviewer's reads, the risk report), `routes_ops` (campaigns,"
        " merchants, the overview), `routes_lottery` (an application, a round's draw)",
        "the reviewer's reads (issue 23) and the lottery's routes have route modules too",
    ),
    "everything answered (drills below); with one replica per primary, claims wait for a"
    " replica again after a failover, so give each primary two": (
        "everything answered, held by every replica that could be promoted (`make chaos`: 0"
        " lost in every cell); claims wait (503) while one of them is missing, so give each"
        " primary two on a cluster and supervise every node (what it costs)",
        "a replica acknowledgement now waits for every replica the failover authority could"
        " promote, and its cost in availability is described beside it (issue 20)",
    ),
    "Prometheus with `alerts.yml`, Grafana": (
        "Prometheus with `alerts.yml` and `alerts-gate.yml`, Grafana",
        "compose mounts deploy/prometheus/, whose prometheus.yml also loads the gate's alerts"
        " (issue 20)",
    ),
    "(in `make test`, about 1 minute)": (
        "(in `make test`, about half a minute)",
        "issue 20 retired the cluster replica and Sentinel drills (the chaos cells cover"
        " them): the file took 33 s instead of 126 s",
    ),
    "`replica` waits for every replica the primary has connected (at least one), read from"
    " `INFO replication` at most once a second: with `WAIT 1` and two replicas, a failover"
    " can promote the one that had not confirmed": (
        "`replica` then waited for every replica the primary had connected (at least one),"
        " read from `INFO replication` at most once a second: with `WAIT 1` and two replicas,"
        " a failover could promote the one that had not confirmed; since issue 20 it waits for"
        " every replica that could be promoted, attached or not (the rule)",
        "the rule changed with issue 20; the sentence tells what it was at the drill's run",
    ),
    "283 acknowledged claims vanished (see Known gaps)": (
        "283 acknowledged claims vanished (the split brain below, closed by issue 20)",
        "the split brain is no longer a known gap (issue 20)",
    ),
    "The drill now restarts it once every Sentinel names the new primary": (
        "The drill then restarted it once every Sentinel named the new primary",
        "the Sentinel drill is retired (issue 20); make chaos's restart-early cells restart it"
        " early on purpose",
    ),
    "some Sentinel still names it can take and confirm claims (a replica still follows it)"
    " that are wiped when the Sentinels reconfigure it": (
        "some Sentinel still named it could take and confirm claims (a replica still following"
        " it) that were wiped when the Sentinels reconfigured it",
        "issue 20 closed the split brain: the sentence tells what the drill found",
    ),
    "(AOF on, `cluster-node-timeout` 1 s)": (
        "(AOF on, `cluster-node-timeout` 1 s, `min-replicas-to-write` 1)",
        "the embedded sets run every node with the server's own guard (issue 20)",
    ),
    "`replica`: only after `WAIT 1` confirms a replica has them (both on the connection that"
    " ran the script; the flusher then records only entries a replica has)": (
        "`replica`: only after every replica that could be promoted has them (`WAIT` on the"
        " connection that ran the script; while one of them is missing, claims answer 503; the"
        " flusher then records only entries they all have)",
        "a replica acknowledgement waits for every replica the failover authority could"
        " promote, not for one (issue 20)",
    ),
    "still spends its nonce, in one batched script call per tick, so": (
        "is answered at once and still spends its nonce, afterwards: the nonces of refusals"
        " wait up to `claims.SPEND_S` (50 ms) and go in one script call per campaign"
        " (`claims.NonceSpender`, `lua/spend_nonces.lua`; a stopping worker spends what is"
        " waiting), so",
        "a refusal is answered before its nonce is spent, in a background batch of up to"
        " 50 ms (issue 24)",
    ),
    "lives in the global slot, so it is read in the same round trip as the voucher and its"
    " refusal is passed into the script, which answers an idempotent replay first": (
        "lives in the global slot; a merchant's refusal is passed into the script, which answers"
        " an idempotent replay first",
        "payments are micro-batched: one read of the batch's merchants, then one script that"
        " reads the vouchers (issue 24)",
    ),
    "Latest run (2026-12-03, the final code of this stop), medians": (
        "Run of the previous stop (2026-12-03, before issue 24), medians",
        "issue 24's run, with scenario (h) and instruction counts, is now the latest",
    ),
    "/readyz fails when more entries than this wait for PostgreSQL": (
        "/readyz fails when more stream entries than this wait for PostgreSQL (a claim batch"
        " is one entry)",
        "a claim batch's vouchers are one stream entry now (branch stream1)",
    ),
    "Benchmark — make bench (about 7 minutes:": (
        "Benchmark — make bench (about 14 minutes:",
        "timed again on 2026-12-04: settled instruction counts made it longer",
    ),
    "64 KiB body limit, checked before reading)": (
        "64 KiB body limit, past which no body is read)",
        "aiohttp's client_max_size checks the body as it is read (branch refuse7)",
    ),
    "Latest run (2026-12-03, `make surge` on the final code of this stop, all on this 2-core"
    " machine)": (
        "The run of 2026-12-03 (`make surge` on the final code of that stop, all on this 2-core"
        " machine)",
        "a later run (2026-12-05) is the latest; this one is kept below it for comparison",
    ),
    "make test # the whole suite against real embedded servers (about 11 minutes: 4½ on two"
    " workers, 7 alone)": (
        "make test # the whole suite against real embedded servers (about 9 minutes: 3 on two"
        " workers, 6 alone)",
        "measured again on a fresh clone (docs/results.md, the whole suite: stop 36)",
    ),
}

# old sentence -> why it is gone
DROPPED: dict[str, str] = {
    "What is left is mostly aiohttp's own per-request work and the script's dozen commands"
    " (see the after-profiles); a claim route below aiohttp's request objects, one Redis round"
    " trip per redemption, and the claim document stored once in PostgreSQL (not in both"
    " `events` and `vouchers`) are the next steps": (
        "stale: a redemption is one round trip and the issued claim's CPU and instruction rows"
        " pass (issue 24); what is left is measured in docs/results.md's ninth round of"
        " refusals against their floor"
    ),
    "No Docker engine runs on this machine, so the images were not built here": (
        "the image is built and run with podman by make image and tests/test_image.py"
        " (issue 21); docs/design/operations.md describes both"
    ),
    "The Docker images and manifests were validated by tests and tools, not run: no Docker"
    " engine here": (
        "the image now runs (issue 21); the gap that remains, the compose and Kubernetes"
        " manifests never run, is stated in docs/design/operations.md's Known gaps"
    ),
    "redis-py's `Sentinel` asks the Sentinels in turn and takes the first answer; asking all"
    " and taking the newest epoch, or `min-replicas-to-write` with the old primary restarted"
    " only after the failover, would close it": (
        "issue 20 did both and more (majority discovery, ROLE on every connection, the"
        " acknowledgement rule, min-replicas-to-write on every node): the Sentinel split brain"
        " is no longer a known gap; docs/design/topologies.md describes each"
    ),
    "The cluster has no such window (its epochs decide)": (
        "the known gap it qualified (the Sentinel split brain) is closed (issue 20); the"
        " windows left on each topology are tabled in docs/design/topologies.md"
    ),
}

LEAD_IN = re.compile(
    # **Title** (aside): ...   or   **Title.** ...
    r"\*\*(?P<title>[^*]+)\*\*(?:\s*\((?P<aside>(?:[^()]|\([^()]*\))*)\))?\s*:"
    r"|\*\*(?P<sentence>[^*]+[.:])\*\*"
)
LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
ESCAPE = re.compile(r"\\([^\w\s])")
MARKUP = re.compile(r"[*`]")
SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?]\)))\s+")
LIST_ITEM = re.compile(r"^(?:[-*+]|\d+\.)\s+")
TABLE_RULE = re.compile(r"^\|?[\s:|-]+\|?$")
TRAILING = ".:;,"


@dataclass(frozen=True)
class Block:
    """A paragraph (or heading), a table row or a code line, and where it starts."""

    kind: Literal["prose", "row", "code"]
    text: str  # raw Markdown for prose; normalised for rows and code lines
    line: int


@dataclass(frozen=True)
class Unit:
    """One sentence, row or line of the old README, normalised, and its line there."""

    text: str
    line: int


def collapse(text: str) -> str:
    return " ".join(text.split())


def plain(markdown: str) -> str:
    """Markdown prose as the text a reader sees, whitespace collapsed."""
    return collapse(MARKUP.sub("", ESCAPE.sub(r"\1", LINK.sub(r"\1", markdown))))


def table_row(line: str) -> str:
    cells = line.strip().strip("|").split("|")
    return " | ".join(plain(cell) for cell in cells)


def blocks(markdown: str) -> Iterator[Block]:
    paragraph: list[str] = []
    start = 0
    in_code = False
    for number, raw in enumerate(markdown.splitlines(), 1):
        line = raw.strip()
        fence = line.startswith("```")
        if in_code and not fence:
            if line:
                yield Block("code", collapse(line), number)
            continue
        breaks = not line or fence or line.startswith(("|", "#")) or LIST_ITEM.match(line)
        if paragraph and breaks:
            yield Block("prose", " ".join(paragraph), start)
            paragraph = []
        if fence:
            in_code = not in_code
        elif line.startswith("|"):
            if not TABLE_RULE.match(line):
                yield Block("row", table_row(line), number)
        elif line.startswith("#"):
            yield Block("prose", line.lstrip("#"), number)
        elif line:
            start = start if paragraph else number
            paragraph.append(LIST_ITEM.sub("", line))
    if paragraph:
        yield Block("prose", " ".join(paragraph), start)


def pieces(paragraph: str) -> Iterator[str]:
    """A paragraph's text with each bold lead-in (and its aside) cut out as a piece."""
    at = 0
    for match in LEAD_IN.finditer(paragraph):
        yield paragraph[at : match.start()]
        yield from (match[name] or "" for name in ("title", "aside", "sentence"))
        at = match.end()
    yield paragraph[at:]


def units(markdown: str) -> Iterator[Unit]:
    for block in blocks(markdown):
        if block.kind != "prose":
            yield Unit(block.text.casefold(), block.line)
            continue
        for piece in pieces(block.text):
            for sentence in SENTENCE_END.split(plain(piece)):
                text = sentence.strip().rstrip(TRAILING).casefold()
                if any(ch.isalnum() for ch in text):
                    yield Unit(text, block.line)


def corpus(paths: list[Path]) -> str:
    """Every block of the new files, normalised, one per line."""
    lines = []
    for path in paths:
        for block in blocks(path.read_text(encoding="utf-8")):
            lines.append(plain(block.text) if block.kind == "prose" else block.text)
    return "\n".join(lines).casefold()


def normalised(sentence: str) -> str:
    return plain(sentence).rstrip(TRAILING).casefold()


def new_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def old_readme(root: Path) -> str:
    shown = subprocess.run(
        ["git", "show", f"{OLD_REVISION}:README.md"],
        cwd=root,
        check=True,
        capture_output=True,
        text=True,
    )
    return shown.stdout


def problems(
    old: str,
    root: Path,
    rewordings: dict[str, tuple[str, str]] = REWORDED,
    drops: dict[str, str] = DROPPED,
) -> list[str]:
    """What of `old` is not in the new files, and allow-list entries that no longer hold."""
    found = corpus(new_files(root))
    reworded = {normalised(o): normalised(new) for o, (new, _) in rewordings.items()}
    dropped = {normalised(o) for o in drops}
    used: set[str] = set()
    out = []
    for unit in units(old):
        if unit.text in dropped:
            used.add(unit.text)
            continue
        wanted = unit.text
        for words, replacement in reworded.items():
            if words in wanted:
                used.add(words)
                if wanted in found:
                    out.append(f"line {unit.line}: found as it was, no longer reworded: {words}")
                wanted = wanted.replace(words, replacement)
        if wanted not in found:
            out.append(f"line {unit.line}: {wanted}")
    stale = [entry for entry in [*reworded, *dropped] if entry not in used]
    out += [f"allow-list entry not in the old README: {entry}" for entry in stale]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Report what of the old README is missing.")
    parser.add_argument("--old", type=Path, help=f"old README (default: {OLD_REVISION}'s)")
    parser.add_argument("--root", type=Path, default=ROOT, help="repository to check")
    args = parser.parse_args(argv)
    old = args.old.read_text(encoding="utf-8") if args.old else old_readme(args.root)
    missing = problems(old, args.root)
    for problem in missing:
        print(problem)
    print(f"{len(missing)} missing")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
