"""The topics of the `Customer` aggregate's events (cdp/domain.py) as the event store keeps them.

eventsourcing names a stored event by `module:qualname` of its class; the projections select
stored events by these names. A test checks that they equal `get_topic(...)` of the classes.
"""
from __future__ import annotations

_CUSTOMER = "cdp.domain:Customer"

CUSTOMER = _CUSTOMER
REGISTERED = f"{_CUSTOMER}.Registered"
SOURCE_LINKED = f"{_CUSTOMER}.SourceLinked"
EVENT_RECORDED = f"{_CUSTOMER}.EventRecorded"
MERGED = f"{_CUSTOMER}.Merged"
ABSORBED = f"{_CUSTOMER}.Absorbed"
SPLIT = f"{_CUSTOMER}.Split"
SPLIT_OFF = f"{_CUSTOMER}.SplitOff"
MATCH_SUGGESTED = f"{_CUSTOMER}.MatchSuggested"
MATCH_CONFIRMED = f"{_CUSTOMER}.MatchConfirmed"
MATCH_REJECTED = f"{_CUSTOMER}.MatchRejected"
IDENTIFIER_IGNORED = f"{_CUSTOMER}.IdentifierIgnored"
ERASED = f"{_CUSTOMER}.Erased"

# The audit trail: a second aggregate, one stream (cdp/domain.py AuditLog).
AUDIT_LOG = "cdp.domain:AuditLog"
AUDIT_ENTRY = f"{AUDIT_LOG}.Entry"
AUDIT_LOG_ID = "6a1d3f0c2b7e4e0c9f3b5a8d7c6e2f41"
