"""Probabilistic matching: a new record against the earlier records its blocking keys find.

Every candidate pair is compared (identity/comparisons.py) and weighed (identity/model.py). The
matcher answers with *every* record at or above the match threshold — the resolver merges all
their customers, so clusters are the transitive closure of the match pairs and do not depend on
arrival order — and every record between the review and match thresholds, for the review queue.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from identity.blocking import BlockingIndex
from identity.comparisons import shared_values, vector
from identity.features import Features
from identity.model import Model


@dataclass(frozen=True, slots=True)
class Scored:
    source_key: str
    probability: float
    weight: float
    vector: tuple[int | None, ...]
    adjustments: dict[int, float] | None = None  # comparison index -> term-frequency adjustment


class Frequencies(Protocol):
    def occurrences(self, kind: str, value: str) -> tuple[int, int]: ...


class ProbabilisticMatcher:
    """`frequencies` (the resolver's guardrail counts, by default) turn on term-frequency adjustment."""

    def __init__(self, model: Model, blocks: BlockingIndex, match_threshold: float = 0.95,
                 review_threshold: float = 0.5, frequencies: Frequencies | None = None):
        if not 0 < review_threshold <= match_threshold < 1:
            raise ValueError("thresholds must satisfy 0 < review <= match < 1")
        self.model = model
        self.blocks = blocks
        self.match_threshold = match_threshold
        self.review_threshold = review_threshold
        self.frequencies = frequencies

    def compare(self, f: Features, keys: list[str] | None = None) -> list[Scored]:
        """Candidates (from `f`'s blocking `keys`) scoring at least the review threshold, best first."""
        model, records, frequencies = self.model, self.blocks.records, self.frequencies
        probability = model.probability
        out = []
        for source_key in self.blocks.candidates(f, keys):
            other = records[source_key]
            vec = vector(f, other)
            weight = model.weight(vec)
            adjustments = None
            if frequencies is not None:
                shared = shared_values(vec, f, other)
                if shared:
                    adjustments = {i: model.frequency_adjustment(i, vec[i], *frequencies.occurrences(field, value))
                                   for i, field, value in shared}
                    weight += sum(adjustments.values())
            p = probability(weight)
            if p >= self.review_threshold:
                out.append(Scored(source_key, p, weight, vec, adjustments))
        out.sort(key=lambda s: (-s.weight, s.source_key))
        return out

    def evidence(self, scored: Scored) -> dict:
        return {"matched": scored.source_key, "probability": round(scored.probability, 4),
                "weight": round(scored.weight, 2), "fields": self.model.evidence(scored.vector, scored.adjustments),
                "model_version": self.model.version}
