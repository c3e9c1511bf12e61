"""The Fellegi–Sunter model: per comparison level, m (how often true matches land there) and u
(how often non-matches do); the match weight of a level is log2(m/u), and a pair's match
probability comes from the prior λ plus the weights of its levels.

A model is data, not code: it is estimated from the records themselves by identity/training.py,
stored as JSON (in the event store's `identity_model` table, so a run can be reproduced), and the
package ships one estimated on the project's generator as the starting point before any training.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from identity.comparisons import COMPARISONS, Comparison

DEFAULT_MODEL = Path(__file__).with_name("default_model.json")
TABLES = ("CREATE TABLE IF NOT EXISTS identity_model (version INTEGER PRIMARY KEY, model TEXT NOT NULL)",)
SELECT_LATEST = "SELECT model, version FROM identity_model ORDER BY version DESC LIMIT 1"
SELECT_MODELS = "SELECT model, version FROM identity_model"  # another writer's, with a WHERE on cdp_seq
INSERT_MODEL = "INSERT INTO identity_model (version, model) VALUES (?, ?)"
TF_BOUND = 10.0  # a term-frequency adjustment moves a weight by at most this many bits
TF_PSEUDO_RECORDS = 1000  # records' worth of the average (u) a value's observed share is smoothed with


@dataclass
class Model:
    prior: float                          # λ: share of blocked candidate pairs that are matches
    m: dict[str, list[float]]             # comparison name -> m per level
    u: dict[str, list[float]]             # comparison name -> u per level
    trained_on: dict[str, Any]            # what it was estimated from (pairs, records, seed)
    version: int = 0                      # its row in identity_model; 0: the shipped default

    def __post_init__(self) -> None:
        self.names = [c.name for c in COMPARISONS]
        self.weights = [[math.log2(m / u) for m, u in zip(self.m[n], self.u[n])] for n in self.names]
        self.prior_weight = math.log2(self.prior / (1 - self.prior))

    def weight(self, vector: tuple[int | None, ...]) -> float:
        total = self.prior_weight
        for weights, level in zip(self.weights, vector):
            if level is not None:
                total += weights[level]
        return total

    def frequency_adjustment(self, comparison: int, level: int, carrying: int, held: int) -> float:
        """Splink's term-frequency adjustment: the level's u says how often two different people
        agree there on average; the share of records carrying the shared value replaces it. The
        share is smoothed toward u by TF_PSEUDO_RECORDS, so a handful of records does not swing it."""
        u = self.u[self.names[comparison]][level]
        share = (max(carrying, 1) + TF_PSEUDO_RECORDS * u) / (held + TF_PSEUDO_RECORDS)
        return max(-TF_BOUND, min(TF_BOUND, math.log2(u / share)))

    @staticmethod
    def probability(weight: float) -> float:
        return 1.0 / (1.0 + 2.0 ** -weight)

    def evidence(self, vector: tuple[int | None, ...], adjustments: dict[int, float] | None = None,
                 comparisons: tuple[Comparison, ...] = COMPARISONS) -> dict:
        """Field by field: the level each comparison reached and the weight it added (with its
        term-frequency adjustment, when the shared value's rarity moved it)."""
        fields = {}
        for i, (comparison, weights, level) in enumerate(zip(comparisons, self.weights, vector)):
            if level is not None:
                adjustment = (adjustments or {}).get(i, 0.0)
                fields[comparison.name] = {"level": comparison.levels[level].label,
                                           "weight": round(weights[level] + adjustment, 2)}
                if adjustment:
                    fields[comparison.name]["term_frequency"] = round(adjustment, 2)
        return fields

    def describe(self) -> list[tuple[str, tuple[str, ...], list[float]]]:
        """(comparison, level labels, weights) for people to read."""
        return [(c.name, c.labels, w) for c, w in zip(COMPARISONS, self.weights)]

    def to_json(self) -> str:
        return json.dumps({"prior": self.prior, "m": self.m, "u": self.u, "trained_on": self.trained_on},
                          indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, version: int = 0) -> "Model":
        raw = json.loads(text)
        return cls(prior=raw["prior"], m=raw["m"], u=raw["u"], trained_on=raw.get("trained_on", {}), version=version)

    def same_estimate(self, other: "Model") -> bool:
        """Whether two models weigh every pair alike (retraining on unchanged records gives one)."""
        return (self.prior, self.m, self.u) == (other.prior, other.m, other.u)


def load(store_rows: list[tuple]) -> Model:
    """The latest trained model in the store, else the shipped default."""
    if store_rows:
        return Model.from_json(store_rows[0][0], int(store_rows[0][1]))
    return Model.from_json(DEFAULT_MODEL.read_text(encoding="utf-8"))
