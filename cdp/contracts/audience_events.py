"""The topics of the `Audience` and `Destination` aggregates' events (cdp/domain.py) as the event
store keeps them, and how a definition's name becomes its aggregate id. A test checks the topics
equal `get_topic(...)` of the classes."""
from __future__ import annotations

import uuid

AUDIENCE = "cdp.domain:Audience"
AUDIENCE_DEFINED = f"{AUDIENCE}.Defined"
AUDIENCE_REDEFINED = f"{AUDIENCE}.Redefined"
AUDIENCE_DELETED = f"{AUDIENCE}.Deleted"

DESTINATION = "cdp.domain:Destination"
DESTINATION_DEFINED = f"{DESTINATION}.Defined"
DESTINATION_REDEFINED = f"{DESTINATION}.Redefined"
DESTINATION_DELETED = f"{DESTINATION}.Deleted"

_NAMESPACE = uuid.UUID("6f0d2c4e-93a1-4c55-9b1e-3f1f4c2a7d10")


def definition_id(kind: str, name: str) -> str:
    """The aggregate id (hex) of the audience or destination called `name`: one per name, ever."""
    return uuid.uuid5(_NAMESPACE, f"{kind}:{name}").hex
