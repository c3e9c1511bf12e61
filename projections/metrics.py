"""Customer metrics in the unified view, as set-based SQL (exact definitions: docs/metrics.md).

Two kinds, kept apart so that the incremental view and a rebuild always agree:

* **facts** depend only on one customer's own events (orders, spend, email rates, complaints,
  consent …). They are aggregates in the GROUP BY that derives `customers` (`FACT_COLUMNS`), and in
  `customer_business_units`, re-derived for the customers a batch touched.
* **scores** depend on the as-of date (`CDP_AS_OF`) or on the whole population (RFM quintiles, the
  fitted MBG/NBD + Gamma-Gamma model): recency, RFM, segment, lifecycle stage, churn risk,
  predicted value, tier; and the `business_unit_overlap` table, an aggregate over everyone.
  `refresh()` recomputes them for *all* customers in one statement whenever the view has moved on
  or the as-of date changed, and records both in `metric_state`, so no customer keeps a stale
  score because no event touched them. Between two refreshes a batch scores the customers it
  re-derives by what the last one kept (`with_scores`): provisional, never empty.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from datetime import date
from functools import lru_cache
from typing import Callable

import duckdb
import numpy as np
import pyarrow as pa

from projections import clv
from projections.transactions import transaction

CONSENT_PURPOSES = ("email_marketing", "sms_marketing", "phone_marketing", "profiling", "third_party_sharing")
NEW_DAYS = 90          # first purchase at most this many days before as-of: new
AT_RISK_DAYS = 180     # no purchase for more than this: at_risk
CHURNED_DAYS = 365     # no purchase for more than this: churned
AT_RISK_CHURN = 0.5    # churn_risk at or above this: at_risk

_PURCHASE = "e.type = 'cdp.purchase'"
_EMAIL = "e.type = 'cdp.email'"
_TOUCH_CHANNEL = """CASE
      WHEN e.type = 'cdp.purchase' AND e.channel IN ('web', 'online', 'app') THEN 'online'
      WHEN e.type = 'cdp.purchase' AND e.channel IN ('pos', 'store', 'branch') THEN 'store'
      WHEN e.type = 'cdp.purchase' THEN e.channel
      WHEN e.type = 'cdp.call' AND e.direction = 'inbound' THEN 'phone'
      WHEN e.type = 'cdp.email' AND e.action IN ('opened', 'clicked') THEN 'email'
      WHEN e.type = 'cdp.social' THEN 'social' END"""


def count_distinct(value: str, where: str | None = None, few: bool = False) -> str:
    """`count(DISTINCT value) FILTER (WHERE where)`; for a few customers' events (`few`) written as
    the length of a de-duplicated list: the same figure (NULLs not counted, 0 for no rows) from a
    plain aggregate. Each DISTINCT aggregate gets a hash table of its own, a fixed cost per
    statement that dominated the live recompute of a few customers (measured: 118 → 88 ms for 50
    customers' events on a loaded machine); over every customer the lists cost more (measured
    1.2 → 2.9 s on 300,000), so the full recompute keeps DISTINCT."""
    if not few:
        return f"count(DISTINCT {value})" + (f" FILTER (WHERE {where})" if where else "")
    collected = f"list({value})" + (f" FILTER (WHERE {where})" if where else "")
    return f"coalesce(len(list_distinct({collected})), 0)"


def most_common(value: str, few: bool = False) -> str:
    """The most frequent non-NULL `value`, the smallest of them on a tie (NULL: none). For a few
    customers' events (`few`) counted in the list of values rather than by `histogram`, which DuckDB
    rewrites into a second GROUP BY joined back through a CTE: a fixed cost of its own per statement
    (measured 3-4 ms of a live batch's ~20 ms recompute on 1,000,000 customers); same figure."""
    if not few:
        return (f"list_sort(list_transform(map_entries(histogram({value})), "
                "lambda c: {'n': -(c.value::BIGINT), 'channel': c.key}))[1].channel")
    values = f"list({value})"
    return (f"list_sort(list_transform(list_distinct({values}), "
            f"lambda c: {{'n': -len(list_filter({values}, lambda x: x = c)), 'channel': c}}))[1].channel")


def fact_columns(few: bool = False) -> dict[str, tuple[str, str]]:
    """name -> (DuckDB type, aggregate over customer_events e of one customer); `few`: see count_distinct."""
    def campaigns(action: str) -> str:
        return count_distinct("e.campaign", f"{_EMAIL} AND e.action = '{action}'", few)

    def campaign_rate(action: str) -> str:
        return f"round({campaigns(action)} / nullif({campaigns('sent')}, 0), 4)"

    return {
        "orders": ("BIGINT", f"count(*) FILTER (WHERE {_PURCHASE})"),
        "lifetime_value": ("DOUBLE", f"round(coalesce(sum(e.amount) FILTER (WHERE {_PURCHASE}), 0), 2)"),
        "avg_order_value": ("DOUBLE", f"round(sum(e.amount) FILTER (WHERE {_PURCHASE}) / "
                                      f"nullif(count(*) FILTER (WHERE {_PURCHASE}), 0), 2)"),
        "first_purchase_at": ("TIMESTAMPTZ", f"min(e.time) FILTER (WHERE {_PURCHASE})"),
        "last_purchase_at": ("TIMESTAMPTZ", f"max(e.time) FILTER (WHERE {_PURCHASE})"),
        "purchase_days": ("INTEGER", f"{count_distinct('e.time::DATE', _PURCHASE, few)}::INTEGER"),
        "preferred_channel": ("VARCHAR", most_common(_TOUCH_CHANNEL, few)),
        "emails_sent": ("BIGINT", campaigns("sent")),
        "email_open_rate": ("DOUBLE", campaign_rate("opened")),
        "email_click_rate": ("DOUBLE", campaign_rate("clicked")),
        "email_unsubscribed": ("BOOLEAN", f"coalesce(max(e.time) FILTER (WHERE {_EMAIL} AND e.action = 'unsubscribed') > "
                                          "coalesce(max(e.time) FILTER (WHERE e.type = 'cdp.consent' AND e.purpose = "
                                          "'email_marketing' AND e.granted), '-infinity'::TIMESTAMPTZ), false)"),
        "calls": ("BIGINT", "count(*) FILTER (WHERE e.type = 'cdp.call')"),
        "complaints": ("BIGINT", "count(*) FILTER (WHERE (e.type = 'cdp.call' AND e.outcome = 'complaint') OR "
                                 "(e.type = 'cdp.feedback' AND e.kind = 'csat' AND e.score <= 2))"),
        "nps_score": ("DOUBLE", "arg_max(e.score, (e.time, e.position)) FILTER (WHERE e.type = 'cdp.feedback' "
                                "AND e.kind = 'nps')"),
        "nps_class": ("VARCHAR", "CASE WHEN nps_score >= 9 THEN 'promoter' WHEN nps_score >= 7 THEN 'passive' "
                                 "WHEN nps_score >= 0 THEN 'detractor' END"),
        "csat_avg": ("DOUBLE", "round(avg(e.score) FILTER (WHERE e.type = 'cdp.feedback' AND e.kind = 'csat'), 2)"),
        **{f"consent_{purpose}": ("BOOLEAN", "arg_max(e.granted, (e.time, e.position)) FILTER (WHERE "
                                             f"e.type = 'cdp.consent' AND e.purpose = '{purpose}')")
           for purpose in CONSENT_PURPOSES},
    }


FACT_COLUMNS = fact_columns()

SCORE_COLUMNS: dict[str, str] = {
    "recency_days": "INTEGER", "rfm_recency": "TINYINT", "rfm_frequency": "TINYINT", "rfm_monetary": "TINYINT",
    "rfm_segment": "VARCHAR", "lifecycle_stage": "VARCHAR", "churn_risk": "DOUBLE",
    "predicted_value_12m": "DOUBLE", "tier": "VARCHAR",
    "scores_withheld": "BOOLEAN",  # the person withdrew `profiling` consent: no score is computed
}
# Whose scores are computed: not those who withdrew profiling consent (never stated: computed).
PROFILING_ALLOWED = "consent_profiling IS DISTINCT FROM false"



def _select(columns: dict[str, tuple[str, str]]) -> str:
    return ",\n  ".join(f"{sql} AS {name}" for name, (_, sql) in columns.items())


FACTS_SELECT = _select(FACT_COLUMNS)
FACTS_SELECT_FEW = _select(fact_columns(few=True))  # the same facts for a few customers' events
CUSTOMER_METRIC_COLUMNS = ", ".join(
    [f"{name} {kind}" for name, (kind, _) in FACT_COLUMNS.items()] + [f"{n} {k}" for n, k in SCORE_COLUMNS.items()])

UNITS_DDL = (
    "CREATE TABLE IF NOT EXISTS customer_business_units (customer_id VARCHAR NOT NULL, "
    "business_unit VARCHAR NOT NULL, spend DOUBLE NOT NULL, orders BIGINT NOT NULL, first_seen TIMESTAMPTZ, "
    "last_seen TIMESTAMPTZ, interactions BIGINT NOT NULL)"
)
UNITS_SELECT = f"""
SELECT e.customer_id, e.business_unit,
  round(coalesce(sum(e.amount) FILTER (WHERE {_PURCHASE}), 0), 2) AS spend,
  count(*) FILTER (WHERE {_PURCHASE}) AS orders,
  min(e.time) AS first_seen, max(e.time) AS last_seen,
  count(*) FILTER (WHERE e.type IN ('cdp.call', 'cdp.email', 'cdp.social', 'cdp.feedback')) AS interactions
FROM {{events}} e
"""
OVERLAP_DDL = (
    "CREATE TABLE IF NOT EXISTS business_unit_overlap (unit_x VARCHAR NOT NULL, unit_y VARCHAR NOT NULL, "
    "customers_x BIGINT NOT NULL, customers_both BIGINT NOT NULL, share_of_x DOUBLE NOT NULL, "
    "spend_in_x DOUBLE NOT NULL, spend_in_y DOUBLE NOT NULL, value_both DOUBLE NOT NULL)"
)
# Materialised by refresh (a self-join of 1.5M unit rows is too slow to run at query time). A unit
# with itself is every customer of that unit: one GROUP BY; only customers of several units (one
# row per unit each) can make a pair of two, so only their rows are joined (1,000,000 customers of
# one unit each: 161 → 10 ms; 81,286 of whom 32,539 in several units: 21 → 19 ms).
OVERLAP_SELECT = """
WITH several AS (
  SELECT u.* FROM customer_business_units u
  WHERE u.customer_id IN (SELECT customer_id FROM customers WHERE len(business_units) > 1)),
pairs AS (
  SELECT business_unit AS unit_x, business_unit AS unit_y, count(*) AS customers_both,
         round(sum(spend), 2) AS spend_in_x, round(sum(spend), 2) AS spend_in_y
  FROM customer_business_units GROUP BY ALL
  UNION ALL
  SELECT x.business_unit, y.business_unit, count(*), round(sum(x.spend), 2), round(sum(y.spend), 2)
  FROM several x JOIN several y ON x.customer_id = y.customer_id AND x.business_unit <> y.business_unit
  GROUP BY ALL)
SELECT p.unit_x, p.unit_y, t.customers_both AS customers_x, p.customers_both,
       round(p.customers_both / t.customers_both, 4) AS share_of_x, p.spend_in_x, p.spend_in_y,
       round(p.spend_in_x + CASE WHEN p.unit_x = p.unit_y THEN 0 ELSE p.spend_in_y END, 2) AS value_both
FROM pairs p JOIN pairs t ON t.unit_x = p.unit_x AND t.unit_y = p.unit_x
"""
STATE_DDL = "CREATE TABLE IF NOT EXISTS metric_state (as_of DATE, position BIGINT, model JSON)"
# The last refresh's RFM boundaries, by which a live batch scores its customers until the next one:
# for s = 2..5, the least value that scored at least s, then the greatest value scored (recency the
# other way round: fewer days score more). A value beyond the greatest one scores 5, as it would in
# a refresh; a value between two others scores as the lower of them.
BOUNDS: dict[str, tuple[str, str, str, bool]] = {  # column -> (type, value, score, more scores more)
    "recency_bounds": ("INTEGER[]", "recency_days", "rfm_recency", False),
    "frequency_bounds": ("BIGINT[]", "orders", "rfm_frequency", True),
    "monetary_bounds": ("DOUBLE[]", "lifetime_value", "rfm_monetary", True),
}
# a view scored before the boundaries were kept takes them on (its next refresh fills them)
DDL = (UNITS_DDL, OVERLAP_DDL, STATE_DDL,
       *(f"ALTER TABLE metric_state ADD COLUMN IF NOT EXISTS {name} {kind}" for name, (kind, *_) in BOUNDS.items()))


def units_sql(members: str | None) -> list[str]:
    """Statements that re-derive `customer_business_units` for the customers `IN members` (an SQL
    set, see tables.scope_members), None = all."""
    if members is None:
        return ["DELETE FROM customer_business_units", f"INSERT INTO customer_business_units {units_select()} GROUP BY ALL"]
    return [
        f"DELETE FROM customer_business_units WHERE customer_id IN {members}",
        f"INSERT INTO customer_business_units {units_select()} "
        f"WHERE e.customer_id IN {members} GROUP BY ALL",
    ]


def units_select(events: str = "customer_events") -> str:
    """The SELECT (before its GROUP BY) of `customer_business_units` from the events in `events`."""
    return UNITS_SELECT.replace("{events}", events)


def _summary(as_of: str, c: str = "") -> dict[str, str]:
    """The buyer's summary the model takes, in whole days: x repeat purchase days, tx from first to
    last purchase day, T from first purchase day to `as_of` (never below tx), spend per purchase
    day; `c`: the customers row's alias and a dot."""
    first, last = f"{c}first_purchase_at::DATE", f"{c}last_purchase_at::DATE"
    return {"x": f"({c}purchase_days - 1)::DOUBLE", "tx": f"date_diff('day', {first}, {last})::DOUBLE",
            "T": f"greatest(date_diff('day', {first}, {as_of}::DATE), date_diff('day', {first}, {last}))::DOUBLE",
            "monetary": f"{c}lifetime_value / {c}purchase_days"}


_SUMMARY = f"""
SELECT customer_id, {", ".join(f"{sql} AS {name}" for name, sql in _summary("$as_of").items())}
FROM customers WHERE orders > 0 AND {PROFILING_ALLOWED} ORDER BY customer_id
"""


def _recency(as_of: str, c: str = "") -> str:
    return f"CASE WHEN {c}orders > 0 THEN greatest(0, date_diff('day', {c}last_purchase_at::DATE, {as_of}::DATE)) END"


def _staged(as_of: str, s: str = "") -> dict[str, str]:
    """Segment, stage and tier from the R, F, M scores and the row `s` (alias and a dot) they were
    scored on: the same rules for a refresh and for a live batch's provisional scores."""
    return {
        "rfm_segment": f"""CASE WHEN {s}orders = 0 THEN 'prospect'
         WHEN rfm_recency >= 4 AND rfm_frequency >= 4 THEN 'champions'
         WHEN rfm_recency >= 3 AND rfm_frequency >= 3 THEN 'loyal'
         WHEN rfm_recency >= 4 AND rfm_frequency = 1 THEN 'new'
         WHEN rfm_recency >= 3 THEN 'potential'
         WHEN rfm_frequency >= 3 THEN 'at_risk'
         WHEN rfm_recency = 2 THEN 'hibernating'
         ELSE 'lost' END""",
        "lifecycle_stage": f"""CASE WHEN {s}orders = 0 THEN 'prospect'
         WHEN date_diff('day', {s}first_purchase_at::DATE, {as_of}::DATE) <= {NEW_DAYS} THEN 'new'
         WHEN {s}recency_days > {CHURNED_DAYS} THEN 'churned'
         WHEN {s}recency_days > {AT_RISK_DAYS} OR {s}churn_risk >= {AT_RISK_CHURN} THEN 'at_risk'
         ELSE 'active' END""",
        "tier": """CASE WHEN rfm_recency + rfm_frequency + rfm_monetary >= 12 THEN 'high_value'
         WHEN rfm_recency + rfm_frequency + rfm_monetary >= 8 THEN 'potential'
         ELSE 'regular' END""",
    }


def _scored(name: str, unscored: str = "staged.scores_withheld") -> str:
    """A score's stored value: NULL where `unscored` (the person withdrew profiling consent)."""
    return f"staged.{name}" if name == "scores_withheld" else f"CASE WHEN {unscored} THEN NULL ELSE staged.{name} END"


# rows whose scores all stay are not written (most of them, between two refreshes on one day): the
# refresh's writes were most of its cost beside a live stream. Which rows changed is decided in the
# same pass that scores them (their stored scores read alongside, `was_*`), so the UPDATE joins only
# those rows to `customers` rather than every customer twice (1,000,000 customers, none changed:
# the statement 290-320 → ~60 ms on one thread).
_SCORES = f"""
WITH scored AS (
  SELECT c.customer_id, c.orders, c.lifetime_value, c.first_purchase_at,
         NOT ({PROFILING_ALLOWED}) AS scores_withheld, {_recency("$as_of", "c.")} AS recency_days,
         round(m.churn_risk, 4) AS churn_risk, round(coalesce(m.predicted_value_12m, 0), 2) AS predicted_value_12m,
         {", ".join(f"c.{name} AS was_{name}" for name in SCORE_COLUMNS)}
  FROM customers c LEFT JOIN model_scores m ON m.customer_id = c.customer_id),
ranked AS (
  SELECT customer_id,
         least(5, 1 + floor(5 * percent_rank() OVER (ORDER BY {_recency("$as_of")} DESC)))::TINYINT AS rfm_recency,
         least(5, 1 + floor(5 * percent_rank() OVER (ORDER BY orders)))::TINYINT AS rfm_frequency,
         least(5, 1 + floor(5 * percent_rank() OVER (ORDER BY lifetime_value)))::TINYINT AS rfm_monetary
  FROM customers WHERE orders > 0 AND {PROFILING_ALLOWED}),
staged AS (
  SELECT s.*, r.rfm_recency, r.rfm_frequency, r.rfm_monetary,
    {", ".join(f"{sql} AS {name}" for name, sql in _staged("$as_of", "s.").items())}
  FROM scored s LEFT JOIN ranked r ON r.customer_id = s.customer_id),
changed AS (
  SELECT customer_id, {", ".join(f"{_scored(name)} AS {name}" for name in SCORE_COLUMNS)}
  FROM staged
  WHERE {" OR ".join(f"staged.was_{name} IS DISTINCT FROM {_scored(name)}" for name in SCORE_COLUMNS)})
UPDATE customers SET {", ".join(f"{name} = changed.{name}" for name in SCORE_COLUMNS)}
FROM changed WHERE customers.customer_id = changed.customer_id
"""


def _bounds(value: str, score: str, ascending: bool) -> str:
    least, most = ("min", "max") if ascending else ("max", "min")
    return (f"[{', '.join(f'{least}({value}) FILTER (WHERE {score} >= {s})' for s in range(2, 6))}, "
            f"{most}({value}) FILTER (WHERE {score} IS NOT NULL)]")


def _provisional_rfm(bounds: str, value: str, ascending: bool) -> str:
    """A score from the boundaries `_bounds` kept (see BOUNDS); 1 where the last refresh had no
    buyer to score, as a lone buyer scores."""
    beyond, within = (">", "<=") if ascending else ("<", ">=")
    return (f"coalesce(CASE WHEN {value} {beyond} {bounds}[5] THEN 5 "
            f"ELSE 1 + len(list_filter({bounds}[1:4], lambda b: b {within} {value})) END, 1)")


_STATE = ("INSERT INTO metric_state BY NAME SELECT $as_of::DATE AS as_of, $position::BIGINT AS position, "
          "$model::JSON AS model, " + ", ".join(f"{_bounds(value, score, ascending)} AS {name}"
                                                 for name, (_, value, score, ascending) in BOUNDS.items())
          # only scored rows count (every aggregate filters on a score): the others are not read
          + " FROM customers WHERE " + " OR ".join(f"{score} IS NOT NULL" for _, _, score, _ in BOUNDS.values()))


def with_scores(facts: str) -> str:
    """`facts` (a SELECT of customers rows without scores) with provisional scores: a live batch
    scores its customers by the last refresh (its as-of date, RFM boundaries and fitted model;
    none before the first refresh), so their profiles carry scores at once rather than none until
    the next refresh, which computes everyone's against the whole population again. Needs the
    functions `register_functions` adds to the connection."""
    summary = ", ".join(_summary("m.as_of", "f.").values())
    bought = "f.orders > 0 AND m.as_of IS NOT NULL"
    rfm = {score: _provisional_rfm(name, value, ascending) for name, (_, value, score, ascending) in BOUNDS.items()}
    return f"""
SELECT * EXCLUDE (score_as_of, {", ".join(BOUNDS)}) REPLACE ({", ".join(
        f"{_scored(name, 'staged.scores_withheld OR staged.score_as_of IS NULL')} AS {name}"
        for name in SCORE_COLUMNS if name != "scores_withheld")})
FROM (
  SELECT ranked.*, {", ".join(f"{sql} AS {name}" for name, sql in _staged("score_as_of").items())}
  FROM (
    SELECT scored.*, {", ".join(f"CASE WHEN orders > 0 THEN ({sql})::TINYINT END AS {name}"
                                for name, sql in rfm.items())}
    FROM (
      SELECT f.*, NOT ({PROFILING_ALLOWED}) AS scores_withheld, {_recency("m.as_of", "f.")} AS recency_days,
             CASE WHEN {bought} THEN round(cdp_churn_risk(m.model, {summary}), 4) END AS churn_risk,
             CASE WHEN {bought} THEN round(coalesce(cdp_predicted_value(m.model, {summary}), 0), 2) ELSE 0 END
               AS predicted_value_12m,
             m.as_of AS score_as_of, {", ".join(f"m.{name}" for name in BOUNDS)}
      FROM ({facts}) f LEFT JOIN metric_state m ON true) scored) ranked) staged
"""


@lru_cache(maxsize=4)
def _params(model: str) -> clv.Params | None:
    try:
        return clv.Params(**json.loads(model))
    except (TypeError, ValueError):
        return None


def _model_function(column: int) -> Callable[..., pa.Array]:
    """cdp_churn_risk (column 0) or cdp_predicted_value (1) of buyers by the model in metric_state:
    one call per batch of rows, as DuckDB hands Arrow vectors (NULL where the model is not one)."""
    def scores(model: pa.ChunkedArray, x: pa.ChunkedArray, tx: pa.ChunkedArray, T: pa.ChunkedArray,
               monetary: pa.ChunkedArray) -> pa.Array:
        params = _params(model[0].as_py()) if len(model) and model[0].is_valid else None
        if params is None:
            return pa.nulls(len(model), pa.float64())
        alive, value = clv.predict(params, *(np.asarray(c.to_numpy(), dtype=float) for c in (x, tx, T, monetary)))
        result = 1.0 - alive if column == 0 else value
        return pa.array(result, mask=~np.isfinite(result))
    return scores


def register_functions(con: duckdb.DuckDBPyConnection) -> None:
    """The model's functions `with_scores` calls, on a connection that projects batches."""
    for name, column in (("cdp_churn_risk", 0), ("cdp_predicted_value", 1)):
        con.create_function(name, _model_function(column), ["VARCHAR", *["DOUBLE"] * 4], "DOUBLE",
                            type="arrow", null_handling="special", side_effects=False)


def _model_scores(con: duckdb.DuckDBPyConnection, as_of: date) -> tuple[pa.Table, clv.Params]:
    summary = con.sql(_SUMMARY, params={"as_of": as_of}).to_arrow_table()
    x, tx, T, monetary = (summary.column(c).to_numpy() for c in ("x", "tx", "T", "monetary"))
    params = clv.fit(x, tx, T, monetary)
    alive, value = clv.predict(params, x, tx, T, monetary)
    return pa.table({"customer_id": summary.column("customer_id"), "churn_risk": pa.array(1.0 - alive),
                     "predicted_value_12m": pa.array(value)}), params


def check_columns(con: duckdb.DuckDBPyConnection, path: object) -> None:
    """A view written before these metrics existed cannot take them incrementally: say so."""
    present = {row[0] for row in con.execute("DESCRIBE customers").fetchall()}
    missing = [name for name in (*FACT_COLUMNS, *SCORE_COLUMNS) if name not in present]
    if missing:
        raise ValueError(f"the view {path} was built by an older version (no {', '.join(missing[:3])} …): "
                         "run `cdp projections rebuild`")


def state(con: duckdb.DuckDBPyConnection) -> tuple[date | None, int | None]:
    rows = con.execute("SELECT as_of, position FROM metric_state").fetchall()
    return rows[0] if rows else (None, None)


def refresh(con: duckdb.DuckDBPyConnection, as_of: date, position: int,
            then: Callable[[duckdb.DuckDBPyConnection], object] | None = None) -> None:
    """Recomputes every customer's scores against `as_of`, in one transaction with metric_state;
    `then(con)` runs last in the same transaction (what depends on the scores: audiences)."""
    scores, params = _model_scores(con, as_of)
    model = json.dumps({k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in asdict(params).items()})
    con.register("model_scores", scores)
    try:
        with transaction(con):
            con.execute(_SCORES, {"as_of": as_of})
            con.execute("DELETE FROM business_unit_overlap")
            con.execute(f"INSERT INTO business_unit_overlap {OVERLAP_SELECT} ORDER BY ALL")
            con.execute("DELETE FROM metric_state")
            con.execute(_STATE, {"as_of": as_of, "position": position, "model": model})
            if then is not None:
                then(con)
    finally:
        con.unregister("model_scores")
