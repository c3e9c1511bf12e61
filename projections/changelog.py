"""The profile changelog for CRMs (`cdp.profiles`, compacted, keyed by customer_id).

Messages are read from the unified view after it has caught up with the store, so a CRM only ever
sees committed data:

* a changed customer: its current unified profile (golden record and metrics), `"position"` being
  the store position the view had reached;
* a customer merged away: a redirect `{"customer_id": absorbed, "merged_into": survivor}`, so a CRM
  holding the old id knows where it went (compaction keeps it as that key's last word);
* an erased customer (`cdp erase`): a tombstone, no value, for the customer and every id merged
  into it, so compaction removes every profile of the person.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import duckdb
import orjson

from projections.tables import scope_members

Message = tuple[bytes, bytes | None]  # (key, value)
LISTED_IDS = 2000  # customers read through one constant id list


def profile_messages(con: duckdb.DuckDBPyConnection, changed: Iterable[str], merged: Mapping[str, str],
                     position: int) -> list[Message]:
    """Messages for `changed` customers (current ids) and `merged` ones (absorbed id -> survivor)."""
    messages: list[Message] = [
        (absorbed.encode(), orjson.dumps({"customer_id": absorbed, "merged_into": survivor, "position": position}))
        for absorbed, survivor in sorted(merged.items())
    ]
    ids = sorted(set(changed) - set(merged))
    for start in range(0, len(ids), LISTED_IDS):
        # a constant list: DuckDB reads the wide columns of the matching rows only, where a
        # subquery of the ids joined every row (1,000,000 customers, 1,000 just re-derived ones:
        # 175 → 36 ms of CPU, measured)
        cursor = con.execute(f"SELECT * FROM customers WHERE customer_id IN {scope_members(ids[start:start + LISTED_IDS])} "
                             "ORDER BY customer_id")
        columns = [d[0] for d in cursor.description]
        for row in cursor.fetchall():
            profile = dict(zip(columns, row))
            profile["position"] = position
            messages.append((profile["customer_id"].encode(), orjson.dumps(profile, default=str)))
    return messages


def tombstones(customer_ids: Iterable[str]) -> list[Message]:
    """The tombstones of an erased person's customer ids."""
    return [(customer_id.encode(), None) for customer_id in sorted(set(customer_ids))]
