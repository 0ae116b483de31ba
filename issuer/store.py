"""PostgreSQL: connection pool, versioned schema migrations, and the durable record."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from issuer.model import DEFAULT_TENANT

log = logging.getLogger("issuer.store")

# Each entry is one migration; never edit an applied one, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE events (
        stream      text        NOT NULL,
        entry_id    text        NOT NULL,
        campaign_id text,
        type        text        NOT NULL,
        data        jsonb       NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (stream, entry_id)
    );
    CREATE INDEX events_campaign_type ON events (campaign_id, type);
    CREATE TABLE campaigns (
        campaign_id text PRIMARY KEY,
        definition  jsonb   NOT NULL,
        version     bigint  NOT NULL,
        status      text    NOT NULL DEFAULT 'active',
        status_version bigint NOT NULL DEFAULT 0,  -- ledger version of the latest status
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE TABLE vouchers (
        voucher_id  text PRIMARY KEY,
        campaign_id text        NOT NULL,
        round_id    text        NOT NULL,
        user_id     text        NOT NULL,
        person_ref  text        NOT NULL,
        status      text        NOT NULL,
        issued_at   timestamptz NOT NULL,
        expires_at  timestamptz NOT NULL,
        reserve_fen bigint      NOT NULL,
        discount_rate_bp integer NOT NULL,
        cap_fen     bigint      NOT NULL,
        device_id   text,
        staff_id    text,
        entry_id    text        NOT NULL
    );
    CREATE INDEX vouchers_campaign_round ON vouchers (campaign_id, round_id);
    CREATE INDEX vouchers_person ON vouchers (campaign_id, person_ref);
    CREATE INDEX vouchers_user ON vouchers (user_id);
    CREATE TABLE registrations (
        campaign_id     text NOT NULL,
        person_ref      text NOT NULL,
        registration_id text NOT NULL UNIQUE,
        user_id         text NOT NULL,
        name_ref        text NOT NULL,
        phone_ref       text NOT NULL,
        registered_at   timestamptz NOT NULL,
        PRIMARY KEY (campaign_id, person_ref)
    );
    CREATE TABLE merchants (
        merchant_id text PRIMARY KEY,
        name        text   NOT NULL,
        county_code text   NOT NULL,
        categories  text[] NOT NULL,
        status      text   NOT NULL,
        entry_ms    bigint NOT NULL,  -- stream entry id of the latest definition
        entry_seq   bigint NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    """,
    """
    ALTER TABLE vouchers ADD COLUMN redemption_id text;
    CREATE TABLE redemptions (
        redemption_id    text PRIMARY KEY,
        campaign_id      text        NOT NULL,
        voucher_id       text        NOT NULL UNIQUE,
        round_id         text        NOT NULL,
        user_id          text        NOT NULL,
        merchant_id      text        NOT NULL,
        order_id         text        NOT NULL,
        order_amount_fen bigint      NOT NULL,
        discount_fen     bigint      NOT NULL,
        payable_fen      bigint      NOT NULL,
        paid_at          timestamptz NOT NULL,
        redeemed_at      timestamptz NOT NULL,
        items            jsonb       NOT NULL,
        refunded_fen     bigint      NOT NULL DEFAULT 0,  -- from refunds, kept in step
        subsidy_returned_fen bigint  NOT NULL DEFAULT 0,
        paid_to_merchant_at timestamptz,
        entry_id         text        NOT NULL,
        UNIQUE (campaign_id, order_id)
    );
    CREATE INDEX redemptions_campaign ON redemptions (campaign_id, redeemed_at);
    CREATE INDEX redemptions_merchant ON redemptions (merchant_id);
    CREATE TABLE refunds (
        refund_id        text PRIMARY KEY,
        campaign_id      text        NOT NULL,
        redemption_id    text        NOT NULL,
        voucher_id       text        NOT NULL,
        amount_fen       bigint      NOT NULL,
        subsidy_returned_fen bigint  NOT NULL,
        clawback_due_fen bigint      NOT NULL,  -- owed back by the merchant (0 if not paid)
        reason           text        NOT NULL,
        created_at       timestamptz NOT NULL,
        repaid_at        timestamptz,
        entry_id         text        NOT NULL
    );
    CREATE INDEX refunds_redemption ON refunds (redemption_id);
    -- the projections below find every money event of a voucher, redemption or refund
    CREATE INDEX events_voucher ON events ((data->>'voucher_id'))
        WHERE type IN ('redemption', 'expiry', 'refund');
    CREATE INDEX events_redemption ON events ((data->>'redemption_id'))
        WHERE type = 'merchant_paid';
    CREATE INDEX events_refund ON events ((data->>'refund_id'))
        WHERE type = 'clawback_repaid';
    """,
    """
    CREATE TABLE settlements (
        redemption_id   text PRIMARY KEY,
        campaign_id     text        NOT NULL,
        merchant_id     text        NOT NULL,
        status          text        NOT NULL,  -- submitted | approved | rejected | paid
        meta            jsonb       NOT NULL,  -- the buyer name only as a keyed hash
        checks          jsonb       NOT NULL,
        checks_passed   boolean     NOT NULL,
        submitted_at    timestamptz NOT NULL,
        decided_at      timestamptz,
        decided_by      text,
        reason          text,
        override_reason text,
        due_date        date,
        disbursement_id text
    );
    CREATE INDEX settlements_queue ON settlements (status, merchant_id, submitted_at);
    CREATE TABLE settlement_files (
        redemption_id text   NOT NULL,
        seq           int    NOT NULL,
        part          text   NOT NULL,
        sha256        text   NOT NULL,
        content_type  text   NOT NULL,
        size          bigint NOT NULL,
        PRIMARY KEY (redemption_id, seq)
    );
    CREATE TABLE disbursements (
        disbursement_id text PRIMARY KEY,
        merchant_id     text        NOT NULL,
        created_at      timestamptz NOT NULL DEFAULT now(),
        created_by      text        NOT NULL,
        due_date        date        NOT NULL,
        total_fen       bigint      NOT NULL,
        paid_at         timestamptz,
        paid_by         text
    );
    -- who did what, when and why; rows are never changed or removed
    CREATE TABLE audit_log (
        id      bigserial PRIMARY KEY,
        at      timestamptz NOT NULL DEFAULT now(),
        actor   text        NOT NULL,
        action  text        NOT NULL,
        subject text        NOT NULL,
        reason  text        NOT NULL DEFAULT '',
        details jsonb       NOT NULL DEFAULT '{}'
    );
    CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit_log is append-only';
    END $$;
    CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
        FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
    -- idempotency of the settlement writes (request_id -> first answer)
    CREATE TABLE settlement_requests (
        key_id      text  NOT NULL,
        request_id  text  NOT NULL,
        fingerprint text  NOT NULL,
        status      int   NOT NULL,
        response    bytea NOT NULL,
        PRIMARY KEY (key_id, request_id)
    );
    """,
    # the part of a discount above the reservation, paid from the campaign pool (rounds
    # record it as overdrawn); redemptions recorded before it was carried hold 0
    """
    ALTER TABLE redemptions ADD COLUMN overdrawn_fen bigint NOT NULL DEFAULT 0;
    """,
    # a due date that reached a year whose official holidays were not known is provisional
    # (weekends only) until that year is known; NULL: final
    """
    ALTER TABLE settlements ADD COLUMN provisional_until_year int;
    ALTER TABLE disbursements ADD COLUMN provisional_until_year int;
    CREATE INDEX settlements_provisional ON settlements (due_date)
        WHERE provisional_until_year IS NOT NULL;
    """,
    # the flusher updates every index of `events` and `vouchers` for each claim: no query
    # reads vouchers by person or by user (Redis answers those), and none reads claims by
    # campaign and type (rebuild reads them through `vouchers`), so those entries go
    """
    DROP INDEX vouchers_person;
    DROP INDEX vouchers_user;
    CREATE INDEX events_campaign_type_unclaimed ON events (campaign_id, type)
        WHERE type <> 'claim';
    DROP INDEX events_campaign_type;
    """,
    # tenants (API.md v1.2): a campaign's is in its definition, a merchant's in its record;
    # a settlement record and a disbursement batch take theirs when made, and an audit entry
    # names the one acted in; everything recorded before tenants belongs to the default one
    f"""
    ALTER TABLE campaigns ADD COLUMN tenant text NOT NULL GENERATED ALWAYS AS
        (coalesce(definition->'definition'->>'tenant', '{DEFAULT_TENANT}')) STORED;
    ALTER TABLE merchants ADD COLUMN tenant text NOT NULL DEFAULT '{DEFAULT_TENANT}';
    ALTER TABLE settlements ADD COLUMN tenant text NOT NULL DEFAULT '{DEFAULT_TENANT}';
    ALTER TABLE disbursements ADD COLUMN tenant text NOT NULL DEFAULT '{DEFAULT_TENANT}';
    ALTER TABLE audit_log ADD COLUMN tenant text NOT NULL DEFAULT '{DEFAULT_TENANT}';
    """,
    # evidence integrity (issuer/integrity.py): the normalised invoice number and files by
    # SHA-256, each one index look-up; each photo's perceptual hashes (whole, five crops),
    # found by their bands (seven index look-ups, then the exact distance).
    # Records stored before keep invoice_key NULL until `integrity.backfill` (run by
    # `issuer serve` right after migrating) gives them the three checks (since migration 9:
    # those marked integrity_pending).
    """
    ALTER TABLE settlements ADD COLUMN invoice_key text;
    CREATE INDEX settlements_invoice_key ON settlements (invoice_key);
    CREATE INDEX settlement_files_sha256 ON settlement_files (sha256);
    CREATE TABLE photo_hashes (
        sha256 text     NOT NULL,
        crop   smallint NOT NULL,  -- 0: the whole photo
        phash  bigint   NOT NULL,
        -- the hash in seven bands (10 + 6 × 9 bits): two hashes within 6 bits of each other
        -- share at least one whole band, so near copies are found by index look-ups
        b0 int GENERATED ALWAYS AS (((phash >> 54) & 1023)::int) STORED,
        b1 int GENERATED ALWAYS AS (((phash >> 45) & 511)::int) STORED,
        b2 int GENERATED ALWAYS AS (((phash >> 36) & 511)::int) STORED,
        b3 int GENERATED ALWAYS AS (((phash >> 27) & 511)::int) STORED,
        b4 int GENERATED ALWAYS AS (((phash >> 18) & 511)::int) STORED,
        b5 int GENERATED ALWAYS AS (((phash >> 9) & 511)::int) STORED,
        b6 int GENERATED ALWAYS AS ((phash & 511)::int) STORED,
        PRIMARY KEY (sha256, crop)
    );
    CREATE INDEX photo_hashes_b0 ON photo_hashes (b0);
    CREATE INDEX photo_hashes_b1 ON photo_hashes (b1);
    CREATE INDEX photo_hashes_b2 ON photo_hashes (b2);
    CREATE INDEX photo_hashes_b3 ON photo_hashes (b3);
    CREATE INDEX photo_hashes_b4 ON photo_hashes (b4);
    CREATE INDEX photo_hashes_b5 ON photo_hashes (b5);
    CREATE INDEX photo_hashes_b6 ON photo_hashes (b6);
    CREATE INDEX audit_log_subject ON audit_log (subject, id);
    """,
    # a blank invoice number has no invoice key (NULL), never "": the backfill of migration
    # 8 gave "" to such records, each then a duplicate of every other. Which records
    # `integrity.backfill` still has to check is marked apart from their key: those never
    # checked, and those given "", checked again without one.
    """
    ALTER TABLE settlements ADD COLUMN integrity_pending boolean NOT NULL DEFAULT false;
    UPDATE settlements SET integrity_pending = true, invoice_key = NULL
        WHERE invoice_key IS NULL OR invoice_key = '';
    ALTER TABLE settlements ADD CONSTRAINT settlements_invoice_key_not_blank
        CHECK (invoice_key <> '');
    CREATE INDEX settlements_integrity_pending ON settlements (redemption_id)
        WHERE integrity_pending;
    """,
)


# The vouchers of the claims a statement just recorded (`new`). A claim rescued late, after
# its voucher's redemption, expiry or refund was recorded, starts with the state those
# events gave it (as PROJECT_MONEY's first statement derives it): one probe of the small
# `events_voucher` index per claim. Events of the statement's own batch are not visible
# to it; a batch holding any runs that projection after it.
VOUCHERS_NEW = """
    INSERT INTO vouchers (voucher_id, campaign_id, round_id, user_id, person_ref, status,
                          issued_at, expires_at, reserve_fen, discount_rate_bp, cap_fen,
                          device_id, staff_id, entry_id, redemption_id)
    SELECT data->>'voucher_id', campaign_id, data->>'round_id', data->>'user_id',
           data->>'person_ref', coalesce(m.status, data->>'status'),
           to_timestamp((data->>'issued_at')::bigint / 1000.0),
           to_timestamp((data->>'expires_at')::bigint / 1000.0),
           (data->>'reserve_fen')::bigint, (data->>'discount_rate_bp')::integer,
           (data->>'cap_fen')::bigint, data->>'device_id', data->>'staff_id', entry_id, m.rid
    FROM new LEFT JOIN LATERAL (
        SELECT s.status, e.data->>'redemption_id' AS rid
        FROM events e,
        LATERAL (SELECT CASE e.type WHEN 'redemption' THEN 'redeemed'
                                    WHEN 'expiry' THEN 'expired'
                                    ELSE e.data->>'voucher_status' END AS status) s
        WHERE e.data->>'voucher_id' = new.data->>'voucher_id'
          AND e.type IN ('redemption', 'expiry', 'refund')
        ORDER BY (s.status = 'refunded') DESC
        LIMIT 1
    ) m ON true
    WHERE new.type = 'claim'
    ON CONFLICT DO NOTHING
"""


def events_of_entries(typed: bool) -> str:
    """CTEs `entries` and `given`: the events of a batch of stream entries, one row each
    ($1 streams, $2 entry ids, $3 campaigns, `typed`: $4 types and $5 documents, else $4
    documents, all claims). An entry whose document is a JSON array holds one event per
    element, numbered `<entry id>-<i>` from 0 (issuer/events.py); any other is one event
    under its entry's id. Expanded here, not in the flusher: asyncpg checks each element of
    an array parameter against two ABCs (~3 µs per claim for four arrays), and the entries
    are fewer than their events. Each document is parsed once (MATERIALIZED: inlined, the
    array would be parsed again for each of its elements)."""
    arrays, columns, kind = ("$4::text[], $5", "t, d", "t") if typed else ("$4", "d", "'claim'")
    return f"""entries AS MATERIALIZED (
    SELECT s, e, nullif(c, '') AS c, {kind} AS t, d::jsonb AS j
    FROM unnest($1::text[], $2::text[], $3::text[], {arrays}::text[]) AS x(s, e, c, {columns})
), given AS (
    SELECT s, CASE jsonb_typeof(j) WHEN 'array' THEN e || '-' || (i - 1) ELSE e END, c, t, doc
    FROM entries,
         LATERAL jsonb_array_elements(CASE jsonb_typeof(j) WHEN 'array' THEN j
                                      ELSE jsonb_build_array(j) END)
             WITH ORDINALITY AS el(doc, i)
)"""


# One statement records a batch of stream entries and projects the new ones into tables.
# Entries already recorded (a re-delivered batch) conflict on the primary key and are
# skipped, so replaying a batch any number of times changes nothing. It answers how many
# events the entries held, recorded before or not.
RECORD_BATCH = """
WITH EVENTS, new AS (
    INSERT INTO events (stream, entry_id, campaign_id, type, data)
    SELECT * FROM given
    ON CONFLICT DO NOTHING
    RETURNING entry_id, campaign_id, type, data
), vouchers_new AS (
    -- VOUCHERS_NEW
), registrations_new AS (
    INSERT INTO registrations (campaign_id, person_ref, registration_id, user_id, name_ref,
                               phone_ref, registered_at)
    SELECT campaign_id, data->>'person_ref', data->>'registration_id', data->>'user_id',
           data->>'name_ref', data->>'phone_ref',
           to_timestamp((data->>'registered_at')::bigint / 1000.0)
    FROM new WHERE type = 'registration'
    ON CONFLICT DO NOTHING
), redemptions_new AS (
    INSERT INTO redemptions (redemption_id, campaign_id, voucher_id, round_id, user_id,
                             merchant_id, order_id, order_amount_fen, discount_fen,
                             payable_fen, paid_at, redeemed_at, items, entry_id,
                             overdrawn_fen)
    SELECT data->>'redemption_id', campaign_id, data->>'voucher_id', data->>'round_id',
           data->>'user_id', data->>'merchant_id', data->>'order_id',
           (data->>'order_amount_fen')::bigint, (data->>'discount_fen')::bigint,
           (data->>'payable_fen')::bigint,
           to_timestamp((data->>'paid_at')::bigint / 1000.0),
           to_timestamp((data->>'redeemed_at')::bigint / 1000.0), data->'items', entry_id,
           coalesce((data->>'overdrawn_fen')::bigint, 0)
    FROM new WHERE type = 'redemption'
    ON CONFLICT DO NOTHING
), refunds_new AS (
    INSERT INTO refunds (refund_id, campaign_id, redemption_id, voucher_id, amount_fen,
                         subsidy_returned_fen, clawback_due_fen, reason, created_at, entry_id)
    SELECT data->>'refund_id', campaign_id, data->>'redemption_id', data->>'voucher_id',
           (data->>'amount_fen')::bigint, (data->>'subsidy_returned_fen')::bigint,
           (data->>'clawback_due_fen')::bigint, data->>'reason',
           to_timestamp((data->>'created_at')::bigint / 1000.0), entry_id
    FROM new WHERE type = 'refund'
    ON CONFLICT DO NOTHING
), campaigns_new AS (
    INSERT INTO campaigns (campaign_id, definition, version, status_version)
    SELECT DISTINCT ON (campaign_id) campaign_id, data, (data->>'version')::bigint,
           (data->>'version')::bigint
    FROM new WHERE type = 'campaign'
    ORDER BY campaign_id, (data->>'version')::bigint DESC
    ON CONFLICT (campaign_id) DO UPDATE
        SET definition = excluded.definition, version = excluded.version,
            status = 'active', status_version = excluded.version, updated_at = now()
        WHERE campaigns.version < excluded.version
), merchants_new AS (
    INSERT INTO merchants (merchant_id, name, county_code, categories, status,
                           entry_ms, entry_seq, tenant)
    SELECT DISTINCT ON (data->>'merchant_id') data->>'merchant_id', data->>'name',
           data->>'county_code', ARRAY(SELECT jsonb_array_elements_text(data->'categories')),
           data->>'status', ms, seq, coalesce(data->>'tenant', 'default')
    FROM new, LATERAL (SELECT split_part(entry_id, '-', 1)::bigint AS ms,
                              split_part(entry_id, '-', 2)::bigint AS seq) AS id
    WHERE type = 'merchant'
    ORDER BY data->>'merchant_id', ms DESC, seq DESC
    ON CONFLICT (merchant_id) DO UPDATE
        SET name = excluded.name, county_code = excluded.county_code,
            categories = excluded.categories, status = excluded.status,
            entry_ms = excluded.entry_ms, entry_seq = excluded.entry_seq, updated_at = now()
        WHERE (merchants.entry_ms, merchants.entry_seq)
            < (excluded.entry_ms, excluded.entry_seq)
)
SELECT count(*) FROM given
""".replace("    -- VOUCHERS_NEW\n", VOUCHERS_NEW).replace("EVENTS", events_of_entries(typed=True))

# A batch of claims only (most batches under load): the same rows as RECORD_BATCH, in a
# statement that plans in a fraction of its time. $1 streams, $2 entry ids, $3 campaigns,
# $4 documents. One statement, so it needs no transaction of its own.
RECORD_CLAIMS = """
WITH EVENTS, new AS (
    INSERT INTO events (stream, entry_id, campaign_id, type, data)
    SELECT * FROM given
    ON CONFLICT DO NOTHING
    RETURNING entry_id, campaign_id, type, data
), vouchers_new AS (
    -- VOUCHERS_NEW
)
SELECT count(*) FROM given
""".replace("    -- VOUCHERS_NEW\n", VOUCHERS_NEW).replace("EVENTS", events_of_entries(typed=False))

# Status changes touch rows that RECORD_BATCH may insert, so they run after it.
# A status older than the one recorded (a batch rescued late) changes nothing.
RECORD_STATUS = """
UPDATE campaigns c SET status = e.status, status_version = e.version, updated_at = now()
FROM (
    SELECT DISTINCT ON (campaign_id) campaign_id, data->>'status' AS status,
           (data->>'version')::bigint AS version
    FROM events
    WHERE stream = ANY($1::text[]) AND entry_id = ANY($2::text[]) AND type = 'status'
    ORDER BY campaign_id, (data->>'version')::bigint DESC
) e
WHERE c.campaign_id = e.campaign_id AND c.status_version < e.version
"""


# Money events change rows that may have arrived in this batch or any earlier one (or, after
# a crashed flusher's entries were rescued late, in a later one). So each statement derives
# the row's state from *every* recorded event of the rows the batch touches, never applies a
# delta: running it again, or in another order, gives the same rows. Each takes the batch's
# ($1 streams, $2 entry ids) and runs after RECORD_BATCH, in its transaction, when the batch
# holds an event of one of the types it is listed with (the types its `touched` selects):
# the others would find nothing to do. A claim alone needs none of them (VOUCHERS_NEW).
PROJECT_MONEY: tuple[tuple[frozenset[str], str], ...] = (
    # a voucher's status: the furthest of its events (refunded > redeemed = expired > issued)
    (
        frozenset({"redemption", "expiry", "refund"}),
        """
    WITH touched AS (
        SELECT DISTINCT data->>'voucher_id' AS voucher_id FROM events
        WHERE stream = ANY($1::text[]) AND entry_id = ANY($2::text[])
          AND type IN ('redemption', 'expiry', 'refund')
    ), latest AS (
        SELECT DISTINCT ON (t.voucher_id) t.voucher_id, s.status, e.data->>'redemption_id' AS rid
        FROM touched t
        JOIN events e ON e.data->>'voucher_id' = t.voucher_id
                     AND e.type IN ('redemption', 'expiry', 'refund'),
        LATERAL (SELECT CASE e.type WHEN 'redemption' THEN 'redeemed'
                                    WHEN 'expiry' THEN 'expired'
                                    ELSE e.data->>'voucher_status' END AS status) s
        ORDER BY t.voucher_id, (s.status = 'refunded') DESC
    )
    UPDATE vouchers v SET status = l.status, redemption_id = coalesce(l.rid, v.redemption_id)
    FROM latest l
    WHERE v.voucher_id = l.voucher_id AND v.status IS DISTINCT FROM l.status
    """,
    ),
    # a redemption's refund totals and reimbursement
    (
        frozenset({"redemption", "refund", "merchant_paid"}),
        """
    WITH touched AS (
        SELECT DISTINCT data->>'redemption_id' AS rid FROM events
        WHERE stream = ANY($1::text[]) AND entry_id = ANY($2::text[])
          AND type IN ('redemption', 'refund', 'merchant_paid')
    ), totals AS (
        SELECT t.rid,
               (SELECT coalesce(sum(amount_fen), 0) FROM refunds f
                WHERE f.redemption_id = t.rid) AS refunded,
               (SELECT coalesce(sum(subsidy_returned_fen), 0) FROM refunds f
                WHERE f.redemption_id = t.rid) AS returned,
               (SELECT min(to_timestamp((e.data->>'paid_ms')::bigint / 1000.0)) FROM events e
                WHERE e.type = 'merchant_paid' AND e.data->>'redemption_id' = t.rid) AS paid
        FROM touched t
    )
    UPDATE redemptions r
    SET refunded_fen = x.refunded, subsidy_returned_fen = x.returned,
        paid_to_merchant_at = x.paid
    FROM totals x
    WHERE r.redemption_id = x.rid
      AND (r.refunded_fen, r.subsidy_returned_fen, r.paid_to_merchant_at)
          IS DISTINCT FROM (x.refunded, x.returned, x.paid)
    """,
    ),
    # a refund's repayment
    (
        frozenset({"refund", "clawback_repaid"}),
        """
    WITH touched AS (
        SELECT DISTINCT data->>'refund_id' AS refund_id FROM events
        WHERE stream = ANY($1::text[]) AND entry_id = ANY($2::text[])
          AND type IN ('refund', 'clawback_repaid')
    )
    UPDATE refunds f
    SET repaid_at = (SELECT min(to_timestamp((e.data->>'repaid_at')::bigint / 1000.0))
                     FROM events e
                     WHERE e.type = 'clawback_repaid' AND e.data->>'refund_id' = t.refund_id)
    FROM touched t
    WHERE f.refund_id = t.refund_id AND f.repaid_at IS NULL
    """,
    ),
)


async def connect(
    dsn: str, min_size: int = 1, max_size: int = 4, *, reset_sessions: bool = True
) -> asyncpg.Pool:
    """A pool. `reset_sessions=False`: a connection goes back without the reset query
    (RESET ALL, CLOSE ALL, UNLISTEN *, advisory unlock; an open transaction is still rolled
    back), for users that leave nothing in a session beyond their transactions."""
    reset = None if reset_sessions else _keep_session
    pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, reset=reset)
    assert pool is not None
    return pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to undo (see `connect`)."""


async def connect_when_up(dsn: str, stop: asyncio.Event) -> asyncpg.Pool | None:
    """A migrated pool, retrying (with backoff, up to 5 s apart) while PostgreSQL is down;
    None if `stop` is set first. It is the flusher's: one batch per connection use, and
    nothing set outside a transaction, so its connections skip the reset query, one round
    trip per batch."""
    delay = 0.2
    while not stop.is_set():
        try:
            pool = await connect(dsn, reset_sessions=False)
            await migrate(pool)
            return pool
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("postgres not reachable, retrying: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 5.0)
    return None


async def migrate(pool: asyncpg.Pool, upto: int | None = None) -> int:
    """Apply pending migrations (up to migration `upto`: the schema an older release left)
    under an advisory lock; returns the schema version."""
    wanted = MIGRATIONS[:upto]
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7262001)")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
        for version, sql in enumerate(wanted, start=1):
            if version > current:
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
        return len(wanted)
