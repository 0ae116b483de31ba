"""Locust scenarios of the 10:00 opening, signed like a real app backend.

- `SurgeUser`: one person, one account; claims as soon as the round opens (a claim sent
  early gets NOT_OPEN and is sent again, new request_id, once the round is open),
  retries timeouts and 5xx with the same request_id. With `--merchant` (mixed), a winner
  pays with the voucher a few seconds later and one in five returns half the order; then
  it idles. `SurgeShape` ramps users from zero to `--surge-users` within `--ramp-s`
  seconds and stops after `--surge-s`. With `--allocation lottery` the round is a lottery:
  each surge user applies once at a random moment of the application window (opening
  `--opens-at`, closing `--applications-close-at`), answered 202 APPLIED, and keeps the
  application id for the harness, which draws after the window.
- `AbuseUser`: one person behind several accounts and devices at once, retry storms of
  one request_id, a replayed signature, locations just outside the Linfen boundary,
  claims to a round that has not opened.

Expected refusals count as successes; a 5xx, a timeout, an unexpected code or a broken
promise (two vouchers for one person, two answers to one request_id, a replay accepted)
is a failure. Every voucher id a client is told about, and every request, is kept; Locust
workers ship theirs to the master with each stats report, so that the master (or the only
process) holds them all and writes `<out>/told-<pid>.txt` and `<out>/requests-<pid>.csv`
for the verifier, the summary and the chart, wherever the workers run. Then its quitting
hook runs `python -m loadtest.verify` and sets Locust's exit code.

Persons are numbered per Locust process (`--processes N` or workers on other machines get
disjoint ranges from their worker index), so distributed runs stay correct.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8080 \\
        --keys-file .issuer/keys.toml --campaign C --future-campaign F --opens-at EPOCH
"""

from __future__ import annotations

import csv
import itertools
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gevent
import msgspec
from locust import FastHttpUser, LoadTestShape, between, events, task
from locust.env import Environment
from locust.runners import WorkerRunner

from issuer.auth import ApiKey, load_keys
from issuer.client import signed_headers
from loadtest import Row
from loadtest.outside import points_just_outside
from tests.people import XIANGNING_SEAT, id_number

ENCODE = msgspec.json.Encoder()
# person numbers: each Locust process owns a block; id_number() stays valid below 20 M
FIRST_PERSON = 3_000_000
PERSONS_PER_PROCESS = 1_000_000
SOLD_OUT = {"ROUND_QUOTA_EXHAUSTED", "ROUND_BUDGET_EXHAUSTED", "BUDGET_EXHAUSTED"}
CLAIM_ANSWERS = {"ISSUED", "REPLAY", "ALREADY_CLAIMED", "NOT_OPEN", *SOLD_OUT}
# what any claim may also get above capacity: shed before it is read, nothing spent
SHED = "OVERLOADED"
GATE_ANSWERS = CLAIM_ANSWERS | {SHED}
# refusals a worker may give before the gate: answered at once, the nonce spent after, so a
# replay that arrives first gets the same refusal (issue 24), a later one 401
LOCAL_REFUSALS = {"NOT_OPEN", *SOLD_OUT}
# refusals that change nothing and are decided again on a retry of the same request, and
# no answer at all (HTTP 0: the client gave up waiting)
DECIDED_AGAIN = {"NOT_OPEN", "OVERLOADED", "HTTP 0"}
RETRIES = 3
SHED_RETRIES = 30  # OVERLOADED answers an app waits out before giving up
REPORT_S = 4  # a Locust worker's report interval, and a second to spare
REFUND_SHARE = 0.2  # of the payments in the mixed scenario
GB_CODE = "6901234567892"  # a valid 13-digit product code


class Process:
    """What one Locust process shares between its users."""

    key: ApiKey
    payment_key: ApiKey
    options: Any
    persons: itertools.count[int]
    told: list[str]  # voucher ids clients were told about, not yet written or shipped
    rows: list[Row]  # one per request, not yet written or shipped
    outside: list[dict[str, float]]
    applied: list[str]  # application ids clients were told about (lottery), not yet written
    answers: set[str]  # what a claim may be answered: CLAIM_ANSWERS, and APPLIED in a lottery
    gate: set[str]  # the same, or shed


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    parser.add_argument("--keys-file", default=".issuer/keys.toml", help="keys file (app key)")
    parser.add_argument("--campaign", default="demo", help="campaign whose round opens")
    parser.add_argument("--future-campaign", default="", help="campaign not open yet (abuse)")
    parser.add_argument(
        "--merchant", default="", help="merchant where winners pay (mixed); none: no payments"
    )
    parser.add_argument("--opens-at", type=float, default=0, help="round opening, epoch s")
    parser.add_argument("--surge-users", type=int, default=2000)
    parser.add_argument("--ramp-s", type=float, default=3)
    parser.add_argument("--surge-s", type=float, default=60, help="whole run, then stop")
    parser.add_argument("--out-dir", default="loadtest/out")
    parser.add_argument("--verify", default="true", help="run loadtest.verify when quitting")
    parser.add_argument(
        "--allocation", default="first_come", choices=("first_come", "lottery"), help="the round's"
    )
    parser.add_argument(
        "--applications-close-at", type=float, default=0, help="lottery: window end, epoch s"
    )


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    options: Any = environment.parsed_options
    runner = environment.runner
    index = runner.worker_index if isinstance(runner, WorkerRunner) else 0
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    Process.options = options
    keys = load_keys(Path(options.keys_file)).values()
    Process.key = next(k for k in keys if k.role == "app")
    Process.payment_key = next(k for k in keys if k.role == "payment")
    first = FIRST_PERSON + index * PERSONS_PER_PROCESS
    Process.persons = itertools.count(first)
    Process.told = []
    Process.rows = []
    Process.outside = points_just_outside()
    Process.applied = []
    lottery = {"APPLIED"} if options.allocation == "lottery" else set()
    Process.answers = CLAIM_ANSWERS | lottery
    Process.gate = GATE_ANSWERS | lottery


@events.report_to_master.add_listener
def _ship(data: dict[str, Any], **_: Any) -> None:
    """On a worker: send what was collected since the last report (the last one is sent
    after the worker's users stopped)."""
    data["issuer_told"], Process.told = Process.told, []
    data["issuer_rows"], Process.rows = Process.rows, []
    data["issuer_applied"], Process.applied = Process.applied, []


@events.worker_report.add_listener
def _collect(data: dict[str, Any], **_: Any) -> None:
    """On the master: keep what a worker shipped."""
    Process.told += data.get("issuer_told", [])
    Process.rows += [tuple(row) for row in data.get("issuer_rows", [])]
    Process.applied += data.get("issuer_applied", [])


@events.quitting.add_listener
def _quitting(environment: Environment, **_: Any) -> None:
    options: Any = environment.parsed_options
    if isinstance(environment.runner, WorkerRunner):
        return  # the master writes and verifies
    out = Path(options.out_dir)
    with (out / f"requests-{os.getpid()}.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(Process.rows)
    (out / f"told-{os.getpid()}.txt").write_text("".join(f"{v}\n" for v in Process.told))
    if options.allocation == "lottery":  # not *.txt: these name applications, not vouchers
        applied = "".join(f"{a}\n" for a in Process.applied)
        (out / f"applied-{os.getpid()}.ids").write_text(applied)
    if options.verify != "true":
        return
    verify = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.verify",
            "--campaign",
            options.campaign,
            "--told",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    (out / "verify.txt").write_text(verify.stdout + verify.stderr)
    print(verify.stdout + verify.stderr, flush=True)
    if verify.returncode != 0:
        environment.process_exit_code = 1


def outcome(status: int, body: bytes) -> tuple[str, Any]:
    """(OK for a 2xx | error code | HTTP <status>, the decoded body) of an answer."""
    try:
        doc = msgspec.json.decode(body) if body else {}
    except msgspec.DecodeError:
        return f"HTTP {status}", None
    if 200 <= status < 300:
        return "OK", doc
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and "code" in error:
        return str(error["code"]), doc
    return f"HTTP {status}", doc


class ClaimingUser(FastHttpUser):
    """Sends signed claims and judges the answers."""

    abstract = True
    network_timeout = 10.0
    connection_timeout = 5.0

    def post(
        self,
        path: str,
        body: dict[str, Any],
        name: str,
        expected: set[str],
        key: ApiKey,
        headers: dict[str, str] | None = None,
        success: str = "OK",
    ) -> tuple[str, Any]:
        """POST signed JSON (signed now unless `headers` are given), judge the answer's
        code (`success` for a 2xx, REPLAY for a replayed one, else the error code) against
        `expected`, log it; returns (code, decoded body)."""
        raw = ENCODE.encode(body)
        headers = headers or signed_headers(key, "POST", path, raw)
        started = time.time()
        with self.client.post(
            path, data=raw.decode(), headers=headers, name=name, catch_response=True
        ) as resp:
            code, doc = outcome(resp.status_code or 0, resp.content or b"")
            if code == "OK":
                replay = resp.headers.get("Idempotent-Replay") == "true"
                code = "REPLAY" if replay else success
                if resp.status_code == 202:  # an application to a lottery round
                    code = "REPLAY" if replay else "APPLIED"
                    if isinstance(doc, dict) and path.endswith("/claims"):
                        Process.applied.append(doc["application_id"])
            ok = code in expected
            if ok:
                resp.success()
            else:
                resp.failure(f"unexpected {code}")
        Process.rows.append((started, name, code, (time.time() - started) * 1000, ok))
        return code, doc

    def send(
        self,
        campaign: str,
        body: dict[str, Any],
        name: str,
        expected: set[str],
        headers: dict[str, str] | None = None,
    ) -> tuple[str, str | None]:
        """POST one claim; returns its outcome (ISSUED | REPLAY | code, voucher id)."""
        path = f"/v1/campaigns/{campaign}/claims"
        code, doc = self.post(path, body, name, expected, Process.key, headers, "ISSUED")
        voucher_id = doc.get("voucher_id") if isinstance(doc, dict) else None
        if voucher_id is None and isinstance(doc, dict):
            voucher_id = (doc.get("error") or {}).get("voucher_id")
        if voucher_id is not None and campaign == Process.options.campaign:
            Process.told.append(voucher_id)
        return code, voucher_id

    def claim_with_retries(
        self, campaign: str, body: dict[str, Any], name: str
    ) -> tuple[str, str | None]:
        """A claim retried like an app would: same request_id after a timeout or a 5xx, and
        after `Retry-After` when the service sheds load (OVERLOADED is an expected answer)."""
        failures = 0
        for _ in range(RETRIES + SHED_RETRIES):
            code, voucher_id = self.send(campaign, body, name, Process.gate)
            if code == SHED:
                gevent.sleep(random.uniform(1.0, 2.0))  # Retry-After: 1, with jitter
                continue
            if code in Process.answers:
                return code, voucher_id
            failures += 1
            if failures == RETRIES:
                break
            gevent.sleep(0.2 * 2**failures)
        return code, voucher_id


def claim_body(person: int, request_id: str, user: str, **extra: Any) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "user_id": user,
        "person": {"id_number": id_number(person)},
        "location": XIANGNING_SEAT,
        **extra,
    }


class SurgeUser(ClaimingUser):
    """One person pressing "claim" at 10:00."""

    weight = 20
    wait_time = between(30, 60)

    def on_start(self) -> None:
        self.person = next(Process.persons)
        self.attempt = 0
        self.done = False
        options = Process.options
        self.at = 0.0  # first come: as soon as it opens
        if options.allocation == "lottery":  # some moment of the window, all equally likely
            self.at = random.uniform(options.opens_at, options.applications_close_at - 1.0)

    @task
    def claim(self) -> None:
        if self.at:
            gevent.sleep(max(0.0, self.at - time.time()))
        while not self.done:
            self.attempt += 1
            body = claim_body(self.person, f"surge-{self.person}-{self.attempt}", f"u{self.person}")
            code, voucher_id = self.claim_with_retries(
                Process.options.campaign, body, "surge claim"
            )
            closed = Process.options.applications_close_at
            if code == "NOT_OPEN" and closed and time.time() >= closed:
                self.done = True  # the window closed before this application got in
                break
            if code == "NOT_OPEN":
                gevent.sleep(max(0.05, Process.options.opens_at - time.time()))
                continue
            self.done = True
            if code in ("ISSUED", "REPLAY") and voucher_id and Process.options.merchant:
                self.pay(voucher_id)

    def pay(self, voucher_id: str) -> None:
        """mixed: a winner pays a few seconds later with the voucher; one in five returns
        part of the order afterwards."""
        gevent.sleep(random.uniform(1, 5))
        amount = random.randrange(100_000, 3_000_000)
        order = f"order-{self.person}"
        body = {
            "request_id": f"pay-{self.person}",
            "voucher_id": voucher_id,
            "user_id": f"u{self.person}",
            "merchant_id": Process.options.merchant,
            "order_id": order,
            "order_amount_fen": amount,
            "paid_at": datetime.now(UTC).isoformat(),
            "items": [
                {
                    "category": "refrigerator",
                    "name": "冰箱",
                    "amount_fen": amount,
                    "quantity": 1,
                    "gb_code": GB_CODE,
                    "energy_grade": 1,
                }
            ],
        }
        key, ok = Process.payment_key, "REDEEMED"
        code, doc = self.post("/v1/redemptions", body, "mixed: redeem", {ok}, key, None, ok)
        if code != "REDEEMED" or random.random() >= REFUND_SHARE:
            return
        gevent.sleep(random.uniform(0.5, 2))
        path = f"/v1/redemptions/{doc['redemption_id']}/refunds"
        back = {"request_id": f"refund-{self.person}", "amount_fen": amount // 2, "reason": "退货"}
        self.post(path, back, "mixed: refund", {"REFUNDED"}, key, None, "REFUNDED")


class AbuseUser(ClaimingUser):
    """What the gate must withstand, mixed into the surge."""

    weight = 1
    wait_time = between(0.5, 1.5)

    def on_start(self) -> None:
        self.person = next(Process.persons)

    @task(3)
    def many_accounts_one_person(self) -> None:
        """Four accounts on two devices claim for the same person at once: one voucher."""
        person = next(Process.persons)
        bodies = [
            claim_body(person, f"multi-{person}-{i}", f"u{person}-{i}", device_id=f"d{i % 2}")
            for i in range(4)
        ]
        jobs = [
            gevent.spawn(self.send, Process.options.campaign, b, "abuse: accounts", Process.gate)
            for b in bodies
        ]
        gevent.joinall(jobs)
        issued = [j.value for j in jobs if j.value and j.value[0] in ("ISSUED", "APPLIED")]
        if len(issued) > 1:
            events.request.fire(
                request_type="CHECK",
                name="abuse: one voucher per person",
                response_time=0,
                response_length=0,
                exception=AssertionError(f"{len(issued)} vouchers for person {person}"),
            )

    @task(3)
    def retry_storm(self) -> None:
        """Five copies of one request (new signatures, same request_id) at once: one answer,
        apart from refusals that change nothing and are decided again (a copy that arrived
        just before the opening, or was shed) and copies the client gave up on."""
        person = next(Process.persons)
        body = claim_body(person, f"storm-{person}", f"u{person}")
        jobs = [
            gevent.spawn(
                self.send, Process.options.campaign, body, "abuse: retry storm", Process.gate
            )
            for _ in range(5)
        ]
        gevent.joinall(jobs)
        first = "APPLIED" if Process.options.allocation == "lottery" else "ISSUED"
        answers = {
            ((first if j.value[0] == "REPLAY" else j.value[0]), j.value[1])
            for j in jobs
            if j.value and j.value[0] not in DECIDED_AGAIN
        }
        if len(answers) > 1:
            events.request.fire(
                request_type="CHECK",
                name="abuse: one answer per request_id",
                response_time=0,
                response_length=0,
                exception=AssertionError(f"request storm-{person} got {sorted(answers)}"),
            )

    @task(2)
    def replayed_signature(self) -> None:
        """The same signed bytes twice: the second is refused 401 (if the first was shed,
        it spent nothing and the second is answered as a first; if the client gave up on
        the first, the service may still be deciding it: then either copy may be the one
        refused, and the other is answered; if the first was refused before the gate, the
        second may get the same refusal, its nonce not spent yet). Either copy may be
        shed."""
        person = next(Process.persons)
        campaign = Process.options.campaign
        body = claim_body(person, f"replay-{person}", f"u{person}")
        path = f"/v1/campaigns/{campaign}/claims"
        headers = signed_headers(Process.key, "POST", path, ENCODE.encode(body))
        first, _ = self.send(campaign, body, "abuse: first of a replay", Process.gate, headers)
        unknown = first in ("HTTP 0", SHED)
        expected = Process.gate | {"UNAUTHENTICATED"} if unknown else {"UNAUTHENTICATED", SHED}
        if first in LOCAL_REFUSALS:
            expected.add(first)
        self.send(campaign, body, "abuse: replayed signature", expected, headers)

    @task(2)
    def just_outside(self) -> None:
        person = next(Process.persons)
        point = Process.outside[person % len(Process.outside)]
        body = claim_body(person, f"outside-{person}", f"u{person}")
        body["location"] = point
        self.send(Process.options.campaign, body, "abuse: just outside", {"OUTSIDE_GEOFENCE", SHED})

    @task(1)
    def before_opening(self) -> None:
        if not Process.options.future_campaign:
            return
        person = next(Process.persons)
        body = claim_body(person, f"early-{person}", f"u{person}")
        self.send(
            Process.options.future_campaign, body, "abuse: before opening", {"NOT_OPEN", SHED}
        )


class SurgeShape(LoadTestShape):
    """Zero to `--surge-users` within `--ramp-s` seconds, hold until `--surge-s`, then down
    to zero: users finish the request in hand (`--stop-timeout`), and the run ends once the
    master has seen no user for a report interval, so that the last reports, with the
    vouchers the users were told about, have arrived. (Ending the run with users still
    running would cut claims off mid-flight: issued, and no client told.)"""

    stopped_at: float | None = None

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        options: Any = self.runner.environment.parsed_options
        run_time = self.get_run_time()
        if run_time >= options.surge_s:
            if self.runner.user_count:
                self.stopped_at = None
            elif self.stopped_at is None:
                self.stopped_at = run_time
            done = self.stopped_at is not None and run_time - self.stopped_at > REPORT_S
            # users get --stop-timeout to finish the request in hand, then two reports
            grace = options.stop_timeout + 2 * REPORT_S + 5
            if done or run_time > options.surge_s + grace:
                return None
            return 0, max(options.surge_users, 1)
        ramp = max(options.ramp_s, 0.1)
        users = min(options.surge_users, int(options.surge_users * (run_time + 1) / ramp))
        return users, options.surge_users / ramp
