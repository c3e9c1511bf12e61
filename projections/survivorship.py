"""Survivorship: which source's value each golden-record field takes, as SQL.

A rule per field (CDP_SURVIVORSHIP, e.g. `email=most_frequent,phone=trusted:bank>telecom`):

* `most_recent`    — the latest non-empty value (the default for every field);
* `most_frequent`  — the value most events gave, the latest of them on a tie;
* `trusted:A>B>…`  — the value from the most trusted business unit that gave one (latest within
                      it); units not listed come after the listed ones, by recency.

Each rule is an ordering key for `arg_max`, so the golden record is one GROUP BY over the events
(ties broken by store position: rebuild and incremental views agree), and the same key picks the
`business_unit:source_id` the value came from, kept in `golden_sources`.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from cdp.contracts.profile import PROFILE_COLUMNS

RULES = ("most_recent", "most_frequent", "trusted")


def parse_rules(raw: Mapping[str, str]) -> dict[str, str]:
    """Validated {field: rule}; raises ValueError naming the bad part."""
    rules = {}
    for name, rule in raw.items():
        if name not in PROFILE_COLUMNS:
            raise ValueError(f"unknown field {name!r} (one of {', '.join(PROFILE_COLUMNS)})")
        kind, _, units = rule.partition(":")
        if kind not in RULES:
            raise ValueError(f"unknown rule {rule!r} for {name} (most_recent, most_frequent, trusted:unit>unit)")
        if kind == "trusted" and not all(u.strip().replace("_", "").replace("-", "").isalnum()
                                         for u in units.split(">")):
            raise ValueError(f"{name}: trusted needs business units in order, like trusted:bank>retail")
        rules[name] = rule
    return rules


def _order_key(column: str, rule: str) -> str:
    kind, _, units = rule.partition(":")
    if kind == "most_frequent":
        return f"(e.{column}__freq, e.time, e.position)"
    if kind == "trusted":
        order = [u.strip() for u in units.split(">")]
        ranks = " ".join(f"WHEN '{u}' THEN {len(order) - i}" for i, u in enumerate(order))
        return f"(CASE e.business_unit {ranks} ELSE 0 END, e.time, e.position)"
    return "(e.time, e.position)"


def golden_columns(columns: Sequence[str], rules: Mapping[str, str]) -> str:
    """The select list of golden fields plus `golden_sources` (field -> business_unit:source_id).
    Value and source come from one `arg_max` of a pair (DuckDB computes an aggregate written twice
    once), so naming the source costs no second pass."""
    values, sources = [], []
    for c in columns:
        key = _order_key(c, rules.get(c, "most_recent"))
        pick = (f"arg_max(struct_pack(v := e.{c}, s := e.business_unit || ':' || e.source_id), {key}) "
                f"FILTER (WHERE e.{c} IS NOT NULL)")
        values.append(f"{pick}.v AS {c}")
        sources.append(f"{c} := {pick}.s")
    return ",\n  ".join(values) + ",\n  struct_pack(" + ", ".join(sources) + ") AS golden_sources"


def golden_sources_type(columns: Sequence[str]) -> str:
    return "STRUCT(" + ", ".join(f"{c} VARCHAR" for c in columns) + ")"


def events_source(rules: Mapping[str, str], where: str = "", table: str = "customer_events") -> str:
    """The events the golden record reads: the table itself, or with per-value counts for the
    most_frequent fields (counted within the customers in scope only)."""
    frequent = [c for c, rule in rules.items() if rule == "most_frequent"]
    if not frequent:
        return table
    counts = ", ".join(f"count(*) OVER (PARTITION BY customer_id, {c}) AS {c}__freq" for c in frequent)
    return f"(SELECT *, {counts} FROM {table} {where})"
