"""The identity side of the view: people's and the resolver's decisions, and how splits move rows.

`identity_decisions` holds one row per decision the store recorded about a source record: review
suggestions (`suggested`, with the match probability and field-by-field evidence), verdicts
(`confirmed`, `rejected`), guardrail notes (`guardrail`: an identifier over its limit did not link)
and splits (`split`: the record left the customer). Links themselves stay where the spine put
them: `customer_sources.linked_by/evidence` and `customer_redirects.rule/evidence`.

A split moves the source records' rows in `customer_sources` and `customer_events` to the new
customer, set-based.
"""
from __future__ import annotations

from cdp.contracts.stored_events import (IDENTIFIER_IGNORED as TOPIC_IGNORED, MATCH_CONFIRMED as TOPIC_CONFIRMED,
                                     MATCH_REJECTED as TOPIC_REJECTED, MATCH_SUGGESTED as TOPIC_SUGGESTED,
                                     SPLIT as TOPIC_SPLIT)

DDL = (
    "CREATE TABLE IF NOT EXISTS identity_decisions (kind VARCHAR NOT NULL, review_id VARCHAR, "
    "customer_id VARCHAR NOT NULL, business_unit VARCHAR NOT NULL, source_id VARCHAR NOT NULL, "
    "other_business_unit VARCHAR, other_source_id VARCHAR, probability DOUBLE, evidence JSON, "
    "position BIGINT NOT NULL)",
)

_STATE = ('{"review_id": "VARCHAR", "business_unit": "VARCHAR", "source_id": "VARCHAR", '
          '"other_business_unit": "VARCHAR", "other_source_id": "VARCHAR", "probability": "DOUBLE", '
          '"evidence": "JSON", "kind": "VARCHAR", "value": "VARCHAR", "records": "BIGINT", "limit": "BIGINT"}')

DECISION_TOPICS = (TOPIC_SUGGESTED, TOPIC_CONFIRMED, TOPIC_REJECTED, TOPIC_IGNORED)  # INSERT_DECISIONS' rows
INSERT_DECISIONS = f"""
INSERT INTO identity_decisions BY NAME
SELECT CASE topic WHEN '{TOPIC_SUGGESTED}' THEN 'suggested' WHEN '{TOPIC_CONFIRMED}' THEN 'confirmed'
                  WHEN '{TOPIC_REJECTED}' THEN 'rejected' ELSE 'guardrail' END AS kind,
       s.review_id, customer_id, s.business_unit, s.source_id, s.other_business_unit, s.other_source_id,
       s.probability,
       CASE WHEN topic = '{TOPIC_IGNORED}'
            THEN to_json({{kind: s.kind, value: s.value, records: s.records, "limit": s."limit"}})
            ELSE s.evidence END AS evidence,
       position
FROM (SELECT position, customer_id, topic, from_json(decode(state), '{_STATE}') AS s
      FROM batch WHERE topic IN ({", ".join(f"'{t}'" for t in DECISION_TOPICS)}))
"""

# The rows the batch's (final) Split moves: old customer, new customer, source record.
SPLIT_MOVES = f"""
CREATE OR REPLACE TEMP TABLE split_moves AS
SELECT customer_id AS old_id, new_id, src[1] AS business_unit, src[2] AS source_id, reason, position
FROM (SELECT customer_id, position, s.new_customer_id AS new_id, s.reason AS reason, unnest(s.sources) AS src
      FROM (SELECT customer_id, position,
                   from_json(decode(state), '{{"new_customer_id": "VARCHAR", "reason": "VARCHAR", "sources": "VARCHAR[][]"}}') AS s
            FROM batch WHERE topic = '{TOPIC_SPLIT}'))
"""


def apply_splits_sql(recompute: bool) -> list[str]:
    moves = []
    for table in ("customer_sources", "customer_events"):
        moves.append(f"UPDATE {table} SET customer_id = m.new_id FROM split_moves m "
                     f"WHERE {table}.business_unit = m.business_unit AND {table}.source_id = m.source_id")
    moves.append(
        "INSERT INTO identity_decisions BY NAME SELECT 'split' AS kind, old_id AS customer_id, business_unit, "
        "source_id, to_json({new_customer_id: new_id, reason: reason}) AS evidence, position FROM split_moves")
    if recompute:
        moves.append("INSERT INTO touched SELECT old_id FROM split_moves UNION SELECT new_id FROM split_moves")
    return moves
