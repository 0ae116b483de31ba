"""Settings, read once at start from an optional TOML file (`ISSUER_CONFIG`) and the
environment (which wins), and validated with clear errors."""

from __future__ import annotations

import os
import secrets
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

# environment variable -> Settings field
ENV = {
    "REDIS_URL": "redis_url",
    "DATABASE_URL": "database_url",
    "ISSUER_DATA_DIR": "data_dir",
    "ISSUER_KEYS_FILE": "keys_file",
    "ISSUER_DOCUMENTS_DIR": "documents_dir",
    "ISSUER_HOLIDAYS_FILE": "holidays_file",
    "ISSUER_PERSON_KEY": "person_key",
    "ISSUER_HOST": "host",
    "ISSUER_PORT": "port",
    "ISSUER_WORKERS": "workers",
    "ISSUER_LOG_LEVEL": "log_level",
    "ISSUER_BATCH_MAX": "batch_max",
    "ISSUER_FLUSH_BATCH": "flush_batch",
    "ISSUER_READY_MAX_LAG": "ready_max_lag",
    "ISSUER_EMBEDDED_PG_FAST": "embedded_pg_fast",
    "ISSUER_SHUTDOWN_GRACE_S": "shutdown_grace_s",
    "ISSUER_RUN_FLUSHER": "run_flusher",
    "ISSUER_CLAIM_QUEUE_MAX": "claim_queue_max",
    "ISSUER_SHED_LAG_MS": "shed_lag_ms",
    "ISSUER_DURABLE_ACK": "durable_ack",
    "ISSUER_ACK_REPLICAS": "ack_replicas",
    "ISSUER_METRICS_PORT": "metrics_port",
    "ISSUER_REDIS_MODE": "redis_mode",
    "ISSUER_SENTINELS": "sentinels",
    "ISSUER_SENTINEL_MASTER": "sentinel_master",
    "ISSUER_EMBEDDED_REDIS": "embedded_redis",
}
# when a claim is answered: at once, once Redis fsynced it, or once a replica has it
DurableAck = Literal["none", "aof", "replica"]
CONFIG_FILE = "ISSUER_CONFIG"  # a TOML file of Settings fields (`workers = 4`)


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    redis_url: str | None = None  # None: start an embedded Valkey under data_dir
    # None: sentinel if sentinels are named, else cluster if redis_url is a cluster node
    redis_mode: Literal["standalone", "cluster", "sentinel"] | None = None
    sentinels: str | None = None  # host:port,host:port of the Sentinels (sentinel mode)
    sentinel_master: str | None = None  # the name the Sentinels know the primary by
    # without redis_url: one embedded Valkey, or a cluster of 3 primaries + 3 replicas
    embedded_redis: Literal["standalone", "cluster"] = "standalone"
    database_url: str | None = None  # None: start an embedded PostgreSQL under data_dir
    data_dir: Path = Path(".issuer")
    keys_file: Path | None = None  # None: data_dir/keys.toml
    documents_dir: Path | None = None  # uploaded reimbursement documents; None: data_dir/documents
    holidays_file: Path | None = None  # official holidays of years chinese-calendar lacks
    person_key: str | None = None  # None: a random key kept in data_dir/person.key
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    batch_max: Annotated[int, Meta(ge=1, le=5000)] = 500  # claims per script call
    # claims one worker holds (admitted, not yet answered); beyond, new ones are shed:
    # 503 OVERLOADED with Retry-After
    claim_queue_max: Annotated[int, Meta(ge=1, le=1_000_000)] = 256
    # a worker whose event loop runs this late sheds claims the same way
    shed_lag_ms: Annotated[int, Meta(ge=1, le=60_000)] = 50
    # "aof": a claim is answered only once WAITAOF confirms Redis fsynced it; "replica":
    # once WAIT confirms a replica received it (both on the connection that ran the script)
    durable_ack: DurableAck = "none"
    # "replica": how many replicas a batch waits for; None: every replica the failover
    # authority could promote (the Sentinels' majority, or the cluster primary's own view)
    ack_replicas: Annotated[int, Meta(ge=0, le=16)] | None = None
    # `issuer flush` on its own (not under `issuer serve`): serve /metrics on this port
    metrics_port: Annotated[int, Meta(ge=1, le=65535)] | None = None
    flush_batch: Annotated[int, Meta(ge=1, le=50000)] = 2000  # stream entries per PG write
    ready_max_lag: Annotated[int, Meta(ge=0)] = 100_000  # unflushed entries before not ready
    embedded_pg_fast: bool = False  # tests: fsync off for the embedded PostgreSQL
    # on SIGTERM, seconds a worker keeps serving while /readyz already fails
    shutdown_grace_s: Annotated[float, Meta(ge=0, le=300)] = 1.0
    run_flusher: bool = True  # false where the flusher runs as its own deployment

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from the `ISSUER_CONFIG` file, then environment variables (empty ones
        ignored), then overrides; SystemExit naming the bad value otherwise."""
        source = os.environ if env is None else env
        values = _config_file(source.get(CONFIG_FILE))
        values.update({field: source[var] for var, field in ENV.items() if source.get(var)})
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return msgspec.convert(values, cls, strict=False, dec_hook=_to_path)
        except msgspec.ValidationError as exc:
            raise SystemExit(f"configuration error: {exc}") from None

    def to_env(self) -> dict[str, str]:
        """The environment variables that give these settings to a child process."""
        out = {}
        for var, field in ENV.items():
            value = getattr(self, field)
            if value is not None:
                out[var] = str(value).lower() if isinstance(value, bool) else str(value)
        return out

    @property
    def external_redis(self) -> bool:
        """Whether a Redis service is given (a URL, or Sentinels), not to be embedded."""
        return bool(self.redis_url or self.sentinels)

    @property
    def keys_path(self) -> Path:
        return self.keys_file or self.data_dir / "keys.toml"

    @property
    def documents_path(self) -> Path:
        return self.documents_dir or self.data_dir / "documents"

    def person_secret(self) -> bytes:
        """The HMAC key for person references; generated once for development."""
        if self.person_key:
            return self.person_key.encode()
        path = self.data_dir / "person.key"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: concurrent first starts agree on one key
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip().encode()
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return path.read_text().strip().encode()


def _config_file(path: str | None) -> dict[str, object]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SystemExit(f"configuration file {path}: {exc}") from None
    unknown = sorted(set(values) - set(Settings.__struct_fields__))
    if unknown:
        raise SystemExit(f"configuration file {path}: unknown setting(s) {', '.join(unknown)}")
    return values


def _to_path(kind: type, value: object) -> Path:
    if kind is Path and isinstance(value, str | Path):
        return Path(value)
    raise NotImplementedError
