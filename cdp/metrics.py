"""The platform's Prometheus metrics, defined once (prometheus_client's default registry) so that
`cdp worker --health-port` and `cdp serve` expose the same names on their `/metrics`.

Names follow Prometheus conventions: `_total` for counters, base units (seconds) for durations.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

EVENTS_CONSUMED = Counter("cdp_events_consumed", "Messages taken from cdp.events by this process")
EVENTS_STORED = Counter("cdp_events_stored", "Domain events committed to the event store by this process")
EVENTS_DEADLETTERED = Counter("cdp_events_deadlettered", "Events rejected to the dead-letter by this process")
PROFILES_PUBLISHED = Counter("cdp_profiles_published", "Profile messages sent to cdp.profiles by this process")
CONSUMER_LAG = Gauge("cdp_consumer_lag", "Messages on cdp.events not yet committed by the consumer group, "
                     "from the broker's committed offsets", ["group"])
BATCH_SECONDS = Histogram("cdp_batch_seconds", "Time to resolve and commit one batch",
                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
RECONNECTS = Counter("cdp_reconnects", "Times a lost dependency came back", ["component"])
DEPENDENCY_UP = Gauge("cdp_dependency_up", "1 when the dependency answered at the last attempt", ["component"])
WAITING_SECONDS = Gauge("cdp_waiting_seconds", "How long this process has been waiting for a dependency "
                        "(0 when not waiting)", ["component"])


def exposition() -> tuple[bytes, str]:
    """The body and content type of a `/metrics` answer."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
