"""Pairwise clustering quality of identity resolution against a ground truth.

A *pair* is two source records put in the same cluster. Precision is the share of predicted pairs
that are truly the same person, recall the share of true pairs that were predicted. Pairs are
counted combinatorially (n·(n−1)/2 per cluster) from contingency counts, never enumerated, so a
million records score in about a second.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PairwiseScores:
    precision: float
    recall: float
    f1: float
    true_pairs: int
    predicted_pairs: int
    correct_pairs: int


def read_truth(path: Path) -> dict[tuple[str, str], str]:
    """``truth.csv`` (header ``business_unit,source_id,person_id``) as
    (business_unit, source_id) -> person_id."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"business_unit", "source_id", "person_id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: truth file lacks column(s) {', '.join(sorted(missing))}")
        return {(row["business_unit"], row["source_id"]): row["person_id"] for row in reader}


def _pairs(n: int) -> int:
    return n * (n - 1) // 2


def pairwise_scores(predicted: Mapping[tuple[str, str], str],
                    truth: Mapping[tuple[str, str], str]) -> PairwiseScores:
    """Score ``predicted`` ((business_unit, source_id) -> customer_id) against ``truth``
    ((business_unit, source_id) -> person_id).

    Only records present in the truth count; a truth record absent from ``predicted`` is its own
    singleton cluster. Precision is 1.0 when nothing was merged, recall 1.0 when nothing should
    have been, F1 is their harmonic mean (0.0 when both are 0).
    """
    per_person: Counter = Counter(truth.values())
    per_cluster: Counter = Counter()
    per_cell: Counter = Counter()
    get = predicted.get
    for key, person in truth.items():
        cluster = get(key)
        if cluster is None:
            continue  # a singleton: contributes no predicted and no correct pair
        per_cluster[cluster] += 1
        per_cell[(cluster, person)] += 1
    true_pairs = sum(_pairs(n) for n in per_person.values())
    predicted_pairs = sum(_pairs(n) for n in per_cluster.values())
    correct_pairs = sum(_pairs(n) for n in per_cell.values())
    precision = correct_pairs / predicted_pairs if predicted_pairs else 1.0
    recall = correct_pairs / true_pairs if true_pairs else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PairwiseScores(precision=precision, recall=recall, f1=f1, true_pairs=true_pairs,
                          predicted_pairs=predicted_pairs, correct_pairs=correct_pairs)
