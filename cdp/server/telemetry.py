"""`/metrics`: Prometheus text from one registry of this server's own (prometheus_client)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

registry = CollectorRegistry()
events_in = Counter("cdp_events_received", "Events received over HTTP", ["api"], registry=registry)
events_accepted = Counter("cdp_events_accepted", "Events accepted (committed or acknowledged)", registry=registry)
events_dead = Counter("cdp_events_deadlettered", "Events dead-lettered, by reason kind", ["kind"], registry=registry)
requests = Counter("cdp_http_requests", "HTTP requests", ["route", "status"], registry=registry)
latency = Histogram("cdp_http_request_seconds", "HTTP request latency", ["route"], registry=registry,
                    buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
view_position = Gauge("cdp_view_position", "Store position the DuckDB view reached", registry=registry)
store_head = Gauge("cdp_store_head", "Highest position in the event store", registry=registry)
profiles_published = Gauge("cdp_profiles_published", "Messages published to cdp.profiles", registry=registry)
