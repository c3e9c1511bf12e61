"""All configuration in one place: environment variables, read once, with their defaults.

The public variables (ARCHITECTURE.md) are CDP_HOME, CDP_EVENT_STORE and CDP_KAFKA_BOOTSTRAP;
the others tune the pipeline and are documented in the README.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the variable."""


def _parse_regions(text: str) -> dict[str, str]:
    regions: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        unit, sep, region = part.partition("=")
        if not sep or not unit.strip() or len(region.strip()) != 2:
            raise ConfigError(
                f"CDP_PHONE_REGIONS: expected unit=REGION pairs like 'retail=GB,bank=DE', got {part!r}"
            )
        regions[unit.strip()] = region.strip().upper()
    return regions


def _number(env: dict[str, str], name: str, default, convert, expected: str):
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError:
        raise ConfigError(f"{name}: expected {expected}, got {raw!r}") from None


def _int(env: dict[str, str], name: str, default: int) -> int:
    value = _number(env, name, default, int, "a whole number")
    if value <= 0:
        raise ConfigError(f"{name}: must be positive, got {value}")
    return value


def _float(env: dict[str, str], name: str, default: float) -> float:
    value = _number(env, name, default, float, "a number")
    if not 0 < value < 1:
        raise ConfigError(f"{name}: must be a probability between 0 and 1 (exclusive), got {value}")
    return value


def _seconds(env: dict[str, str], name: str, default: float) -> float:
    value = _number(env, name, default, float, "a number of seconds")
    if value < 0:
        raise ConfigError(f"{name}: must not be negative, got {value}")
    return value


def _pairs(env: dict[str, str], name: str, example: str) -> dict[str, str]:
    """'key=value,key=value' as a dict; an empty or unset variable is {}."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in env.get(name, "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"{name}: expected key=value pairs like {example!r}, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def _limits(env: dict[str, str]) -> dict[str, int]:
    from ingest.normalise import IDENTIFIER_KINDS

    name = "CDP_IDENTIFIER_LIMITS"
    limits = {}
    for kind, raw in _pairs(env, name, "email=8,phone=8").items():
        if kind not in IDENTIFIER_KINDS:
            raise ConfigError(f"{name}: unknown identifier kind {kind!r} (one of {', '.join(IDENTIFIER_KINDS)})")
        limits[kind] = _int({name: raw}, name, 1)
    return limits


def usable_cores() -> int:
    """The cores this process may run on: a container's or taskset's share, not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_serve_threads() -> int:
    """DuckDB threads of `cdp serve`'s view when CDP_SERVE_THREADS is unset: one on two cores or
    fewer, else DuckDB's own default (0: all cores). The server's statements are small (a live
    batch, a look-up); on two busy cores a statement's share handed to DuckDB's worker thread
    waited for a core while its caller waited for it (bench.visible, Kafka, 120 s, three runs each:
    publish-to-visible p99 563-713 ms with two threads, 496-560 ms with one)."""
    return 1 if usable_cores() <= 2 else 0


def _count(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise ConfigError(f"{name}: expected 0 or a positive whole number, got {raw!r}")
    return int(raw)


def _nice(env: dict[str, str], name: str, default: int) -> int:
    value = _count(env, name, default)
    if value > 19:
        raise ConfigError(f"{name}: expected a niceness from 0 to 19, got {value}")
    return value


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _memory(env: dict[str, str], name: str, default: str) -> str:
    """A DuckDB memory size like 256MB; checked here because DuckDB is handed it as a setting."""
    from projections.sandbox import MEMORY_PATTERN

    raw = env.get(name) or default
    if not MEMORY_PATTERN.match(raw):
        raise ConfigError(f"{name}: expected a size like 256MB or 2GiB, got {raw!r}")
    return raw.strip()


def _duration(env: dict[str, str], name: str, default: float) -> float:
    """Seconds, from '86400', '90s', '15m', '12h' or '1d'."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", raw.lower())
    if not match:
        raise ConfigError(f"{name}: expected a duration like 3600, 90s, 15m, 12h or 1d, got {raw!r}")
    return float(match.group(1)) * _DURATION_UNITS.get(match.group(2) or "s")


def _duration_or_off(env: dict[str, str], name: str, default: float) -> float | None:
    """A duration, or None for 'off'."""
    if (env.get(name) or "").strip().lower() == "off":
        return None
    return _duration(env, name, default)


def _positive_duration_or_off(env: dict[str, str], name: str, default: float) -> float | None:
    """A duration of more than 0 seconds, or None for 'off'."""
    if (env.get(name) or "").strip().lower() == "off":
        return None
    return _positive_duration(env, name, default)


def _positive_duration(env: dict[str, str], name: str, default: float) -> float:
    value = _duration(env, name, default)
    if value <= 0:
        raise ConfigError(f"{name}: must be more than 0 seconds")
    return value


def _positive_number(env: dict[str, str], name: str, default: float) -> float:
    value = _number(env, name, default, float, "a number")
    if not (0 < value < float("inf")):
        raise ConfigError(f"{name}: must be a positive finite number, got {value}")
    return value


def today() -> date:
    """The UTC calendar day: the as-of date where CDP_AS_OF is not set."""
    return datetime.now(timezone.utc).date()


def _as_of(env: dict[str, str]) -> date:
    raw = env.get("CDP_AS_OF")
    if not raw:
        return today()
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise ConfigError(f"CDP_AS_OF: expected YYYY-MM-DD, got {raw!r}") from None


def _identity(env: dict[str, str]) -> dict:
    matching = (env.get("CDP_MATCHING") or "probabilistic").strip().lower()
    if matching not in ("probabilistic", "deterministic"):
        raise ConfigError(f"CDP_MATCHING: expected probabilistic or deterministic, got {matching!r}")
    match = _float(env, "CDP_MATCH_THRESHOLD", 0.95)
    review = _float(env, "CDP_REVIEW_THRESHOLD", 0.5)
    if review > match:
        raise ConfigError(f"CDP_REVIEW_THRESHOLD ({review}) must not exceed CDP_MATCH_THRESHOLD ({match})")
    from projections.survivorship import parse_rules

    try:
        survivorship = parse_rules(_pairs(env, "CDP_SURVIVORSHIP", "email=most_frequent,phone=trusted:bank>retail"))
    except ValueError as error:
        raise ConfigError(f"CDP_SURVIVORSHIP: {error}") from None
    growth = _number(env, "CDP_RETRAIN_GROWTH", 1.0, float, "a number")
    if growth <= 0:
        raise ConfigError(f"CDP_RETRAIN_GROWTH: expected a number above 0, got {growth}")
    return {"matching": matching, "match_threshold": match, "review_threshold": review,
            "train_min_records": _count(env, "CDP_TRAIN_MIN_RECORDS", 1000), "retrain_growth": growth,
            "identifier_limits": _limits(env), "max_block": _int(env, "CDP_MAX_BLOCK", 50),
            "survivorship": survivorship}


@dataclass(frozen=True)
class Settings:
    home: Path
    event_store: str | None = None
    kafka_bootstrap: str | None = None
    default_phone_region: str = "GB"
    phone_regions: dict[str, str] = field(default_factory=dict)
    max_event_bytes: int = 256 * 1024
    batch_size: int = 10000
    projection_batch: int = 25000
    parse_processes: int = 0
    duckdb_memory: str = "256MB"
    score_interval: int = 60
    as_of: date = field(default_factory=today)
    as_of_fixed: bool = False                # CDP_AS_OF set: a running server keeps it (else: today, UTC)
    schemas_dir: Path = REPO_ROOT / "schemas"
    topic_prefix: str = ""
    kafka_partitions: int = 8
    worker_group: str = "cdp-worker"
    worker_batch: int = 5000
    worker_linger_ms: int = 100
    worker_gather_ms: int = 20
    # hardening (README: "Limits")
    max_future: float = 86400.0              # CDP_MAX_FUTURE: event times later than now + this are refused
    max_amount: float = 1e9                  # CDP_MAX_AMOUNT: |amount| and prices above this are refused
    query_rows: int = 100_000                # CDP_QUERY_ROWS: rows one user query may return
    query_seconds: float = 60.0              # CDP_QUERY_TIMEOUT: seconds before a user query is stopped
    # identity resolution (README: "Identity resolution")
    matching: str = "probabilistic"          # CDP_MATCHING: probabilistic | deterministic
    match_threshold: float = 0.95            # CDP_MATCH_THRESHOLD: match probability that links
    review_threshold: float = 0.5            # CDP_REVIEW_THRESHOLD: from here up to the match threshold: review
    identifier_limits: dict[str, int] = field(default_factory=dict)  # CDP_IDENTIFIER_LIMITS: email=8,phone=8,…
    max_block: int = 50                      # CDP_MAX_BLOCK: records compared per blocking key at most
    train_min_records: int = 1000            # CDP_TRAIN_MIN_RECORDS: records held before the first self-training (0: never)
    retrain_growth: float = 1.0              # CDP_RETRAIN_GROWTH: train again once the records grew by this share
    survivorship: dict[str, str] = field(default_factory=dict)  # CDP_SURVIVORSHIP: field=rule,…
    # privacy (README: "Privacy")
    master_key: str | None = field(default=None, repr=False)  # CDP_MASTER_KEY; unset: CDP_HOME/master.key
    encrypt_personal_data: bool = True       # off only for bench/ (the cost of encryption, measured)
    events_retention_days: int = 7           # CDP_EVENTS_RETENTION_DAYS: how long cdp.events keeps raw events
    deadletter_retention: float | None = 28 * 86400.0  # CDP_DEADLETTER_RETENTION: how long the dead-letter
    #                                          file keeps rejected inputs (seconds; None, 'off': for good)
    # cdp serve (README: "The live service")
    rate_limit: int = 200                    # CDP_RATE_LIMIT: requests per second per API key (bursts: twice)
    serve_threads: int = field(default_factory=default_serve_threads)  # CDP_SERVE_THREADS: DuckDB threads
    #                                          of the server's view (0: all cores; unset: default_serve_threads)
    serve_memory: str = "2GB"                # CDP_SERVE_MEMORY: DuckDB memory limit of the server's view (look-up indexes)
    view_rewrite_delay: float | None = 60.0  # CDP_VIEW_REWRITE_DELAY: after an erasure, when the running server
    #                                          rewrites the view's file (None, 'off': only when it stops)
    catch_up_nice: int = 0                   # CDP_CATCH_UP_NICE: niceness added to cdp serve's catch-up work
    trace_stages: bool = False               # CDP_TRACE_STAGES: cdp serve logs each batch's stage times (bench.visible)
    console_session_hours: int = 8           # CDP_CONSOLE_SESSION_HOURS: a console sign-in lasts this long
    # delivery of audience changes to destinations (README: "Audiences and destinations")
    secret_key: str | None = None            # CDP_SECRET_KEY: seals destination secrets (default: CDP_HOME/secret.key)
    delivery_attempts: int = 6               # CDP_DELIVERY_ATTEMPTS: tries per change before the dead-letter
    delivery_backoff: float = 0.5            # CDP_DELIVERY_BACKOFF: first wait between tries, doubled each time
    delivery_max_wait: float = 60.0          # CDP_DELIVERY_MAX_WAIT: longest wait, Retry-After included
    delivery_concurrency: int = 32           # CDP_DELIVERY_CONCURRENCY: requests in flight per destination
    delivery_timeout: float = 10.0           # CDP_DELIVERY_TIMEOUT: seconds per request

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        store = env.get("CDP_EVENT_STORE") or None
        if store and not store.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                f"CDP_EVENT_STORE: expected a postgresql:// URL (or unset for SQLite), got {store!r}"
            )
        default_region = (env.get("CDP_DEFAULT_PHONE_REGION") or "GB").upper()
        if len(default_region) != 2:
            raise ConfigError(f"CDP_DEFAULT_PHONE_REGION: expected a two-letter region, got {default_region!r}")
        return cls(
            home=Path(env.get("CDP_HOME") or ".cdp"),
            event_store=store,
            kafka_bootstrap=env.get("CDP_KAFKA_BOOTSTRAP") or None,
            default_phone_region=default_region,
            phone_regions=_parse_regions(env.get("CDP_PHONE_REGIONS", "")),
            max_event_bytes=_int(env, "CDP_MAX_EVENT_BYTES", 256 * 1024),
            batch_size=_int(env, "CDP_BATCH_SIZE", 10000),
            projection_batch=_int(env, "CDP_PROJECTION_BATCH", 25000),
            duckdb_memory=_memory(env, "CDP_DUCKDB_MEMORY", "256MB"),
            score_interval=_int(env, "CDP_SCORE_INTERVAL", 60),
            parse_processes=_count(env, "CDP_PARSE_PROCESSES", 0),
            as_of=_as_of(env),
            as_of_fixed=bool(env.get("CDP_AS_OF")),
            schemas_dir=Path(env.get("CDP_SCHEMAS") or REPO_ROOT / "schemas"),
            topic_prefix=env.get("CDP_TOPIC_PREFIX", ""),
            kafka_partitions=_int(env, "CDP_KAFKA_PARTITIONS", 8),
            worker_group=env.get("CDP_WORKER_GROUP") or "cdp-worker",
            worker_batch=_int(env, "CDP_WORKER_BATCH", 5000),
            worker_linger_ms=_int(env, "CDP_WORKER_LINGER_MS", 100),
            worker_gather_ms=_count(env, "CDP_WORKER_GATHER_MS", 20),
            master_key=env.get("CDP_MASTER_KEY") or None,
            events_retention_days=_int(env, "CDP_EVENTS_RETENTION_DAYS", 7),
            deadletter_retention=_positive_duration_or_off(env, "CDP_DEADLETTER_RETENTION", 28 * 86400.0),
            max_future=_duration(env, "CDP_MAX_FUTURE", 86400.0),
            max_amount=_positive_number(env, "CDP_MAX_AMOUNT", 1e9),
            query_rows=_int(env, "CDP_QUERY_ROWS", 100_000),
            query_seconds=_positive_duration(env, "CDP_QUERY_TIMEOUT", 60.0),
            rate_limit=_int(env, "CDP_RATE_LIMIT", 200),
            serve_threads=_count(env, "CDP_SERVE_THREADS", default_serve_threads()),
            serve_memory=_memory(env, "CDP_SERVE_MEMORY", "2GB"),
            view_rewrite_delay=_duration_or_off(env, "CDP_VIEW_REWRITE_DELAY", 60.0),
            catch_up_nice=_nice(env, "CDP_CATCH_UP_NICE", 0),
            trace_stages=env.get("CDP_TRACE_STAGES", "") not in ("", "0"),
            console_session_hours=_int(env, "CDP_CONSOLE_SESSION_HOURS", 8),
            secret_key=env.get("CDP_SECRET_KEY") or None,
            delivery_attempts=_int(env, "CDP_DELIVERY_ATTEMPTS", 6),
            delivery_backoff=_seconds(env, "CDP_DELIVERY_BACKOFF", 0.5),
            delivery_max_wait=_seconds(env, "CDP_DELIVERY_MAX_WAIT", 60.0),
            delivery_concurrency=_int(env, "CDP_DELIVERY_CONCURRENCY", 32),
            delivery_timeout=_seconds(env, "CDP_DELIVERY_TIMEOUT", 10.0),
            **_identity(env),
        )

    def phone_region(self, business_unit: str) -> str:
        return self.phone_regions.get(business_unit, self.default_phone_region)

    @property
    def sqlite_path(self) -> Path:
        return self.home / "events.sqlite"

    @property
    def intake_path(self) -> Path:
        """What the embedded `cdp serve` accepted and has not resolved yet (cdp/intake.py)."""
        return self.home / "intake.sqlite"

    @property
    def duckdb_path(self) -> Path:
        return self.home / "view.duckdb"

    def topic(self, name: str) -> str:
        """A Kafka topic's name (`cdp.events` …) after CDP_TOPIC_PREFIX."""
        return self.topic_prefix + name

    def require_kafka(self) -> str:
        if not self.kafka_bootstrap:
            raise ConfigError("CDP_KAFKA_BOOTSTRAP is not set: give the Kafka broker as host:port")
        return self.kafka_bootstrap

    @property
    def master_key_path(self) -> Path:
        return self.home / "master.key"

    @property
    def console_sessions_path(self) -> Path:
        """The console's open sessions (hashed ids), so a restart of `cdp serve` keeps them."""
        return self.home / "console-sessions.sqlite"

    @property
    def console_key_path(self) -> Path:
        """The key console cookies and CSRF tokens are signed with (made on first use, mode 0600)."""
        return self.home / "console.key"

    @property
    def server_file(self) -> Path:
        """Where a running `cdp serve` leaves its address and local key for the CLI (mode 0600)."""
        return self.home / "server.json"

    @property
    def unfinished_erasure_path(self) -> Path:
        """Made before an erasure commits, removed once the view, the dead-letter and the store's
        files are clean: while it is there, a stop part-way (a crash, a full disk) left work for
        the next command that opens the view (cdp/erasure.py)."""
        return self.home / "erasure.unfinished"

    @property
    def erasure_lock_path(self) -> Path:
        """Held while an erasure runs (this process's or another's), or one stopped part-way is finished."""
        return self.home / "erasure.lock"

    @property
    def unsent_tombstones_path(self) -> Path:
        """The erased customer ids whose tombstones cdp.profiles has not had yet (no personal data:
        the Erased event carries them too)."""
        return self.home / "erasure.tombstones"

    @property
    def unscrubbed_tables_path(self) -> Path:
        """The store's tables an erasure could not rewrite and a later try may (PostgreSQL: held by
        another session meanwhile): their files still hold the deleted rows (cdp/erasure.py)."""
        return self.home / "erasure.store_tables"

    @property
    def deadletter_path(self) -> Path:
        return self.home / "deadletter.jsonl"
