"""Estimating the Fellegi–Sunter model from the records themselves, as record-linkage practice does.

* u (how often two *different* people agree at each level) from random pairs of records: almost
  every random pair is a non-match.
* m (how often the *same* person does) by expectation–maximisation, u held fixed, in *sessions*
  as Splink does: each session takes the pairs of one blocking rule and leaves out the comparisons
  that rule blocked on, even in part (they agree by construction), so the fields a household shares
  (address, phone) are learned from pairs blocked on name and birth year, names from pairs blocked
  on birth date and postcode, and the date of birth from pairs blocked on name and postcode. Each comparison takes its m from the sessions that did not block on it.
* the prior λ — the probability that two records drawn at random are the same person, as in
  Splink — from the matches the same EM expects among all blocked pairs (m and u held fixed),
  divided by the number of all pairs of records.

The pairs are counted by comparison vector first, so each EM iteration costs one pass over the
distinct vectors, not over the pairs.

Seeded sampling makes the estimate reproducible; the result records what it was trained on.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Mapping, Sequence

from identity.blocking import blocking_keys
from identity.comparisons import COMPARISONS, vector
from identity.features import Features
from identity.model import Model

FLOOR = 1e-6


def _levels(i: int) -> int:
    return len(COMPARISONS[i].levels)


def _normalise(counts: list[float]) -> list[float]:
    total = sum(counts)
    return [max(c / total, FLOOR) if total else 1.0 / len(counts) for c in counts]


def estimate_u(records: Sequence[Features], pairs: int, rng: random.Random) -> dict[str, list[float]]:
    counts = [[0.5] * _levels(i) for i in range(len(COMPARISONS))]  # half a pseudo-count per level
    n = len(records)
    for _ in range(pairs if n > 1 else 0):
        a, b = rng.randrange(n), rng.randrange(n)
        if a != b:
            for i, level in enumerate(vector(records[a], records[b])):
                if level is not None:
                    counts[i][level] += 1
    return {c.name: _normalise(counts[i]) for i, c in enumerate(COMPARISONS)}


# blocking rule (key prefix) -> the comparisons it blocks on, wholly or in part: a session must not
# learn m for a comparison its pairs agree on by construction (names + birth *year* biases the
# date's levels; a shared postcode biases the address comparison, which holds the postcode), so
# every comparison is learned from a session that did not select its pairs by it
SESSIONS = {"ny:": ("first_name", "last_name", "date_of_birth"), "dp:": ("date_of_birth", "address_phone"),
            "np:": ("first_name", "last_name", "address_phone")}


def has_pairs(blocks: Mapping[str, Sequence[str]]) -> bool:
    """Whether a blocking index (key -> records) holds a block of two records or more under every
    session's prefix: without one, `train` finds no candidate pairs to learn from. A worker asks
    before it starts a training process, which would otherwise load every record only to find none
    (a stream of records sharing no name, birth date or address started one every few seconds)."""
    wanted = set(SESSIONS)
    for key, members in blocks.items():
        if len(members) > 1:
            wanted.discard(key[:key.find(":") + 1])
            if not wanted:
                return True
    return False


def blocked_vectors(records: Sequence[Features], max_block: int, prefix: str = "") -> Counter:
    """Comparison vectors of the pairs sharing a blocking key (that starts with `prefix`), counted."""
    blocks: dict[str, list[int]] = {}
    for i, f in enumerate(records):
        for key in blocking_keys(f):
            if not key.startswith(prefix):
                continue
            members = blocks.setdefault(key, [])
            if len(members) < max_block:
                members.append(i)
    pairs = {(a, b) for members in blocks.values() for j, b in enumerate(members) for a in members[:j]}
    return Counter(vector(records[a], records[b]) for a, b in pairs)


def expectation_maximisation(patterns: Counter, u: dict[str, list[float]], iterations: int = 40,
                             prior: float = 0.3, m: dict[str, list[float]] | None = None,
                             ignore: Sequence[str] = ()) -> tuple[float, dict[str, list[float]]]:
    """(λ, m) from counted comparison vectors; m is re-estimated unless given, `ignore`d
    comparisons neither count as evidence nor get an estimate."""
    names = [c.name for c in COMPARISONS]
    learn_m = m is None
    if m is None:  # start: agreement levels likelier for matches, halving down the levels
        m = {name: _normalise([2.0 ** -k for k in range(_levels(i))]) for i, name in enumerate(names)}
    used = [i for i, name in enumerate(names) if name not in ignore]
    items = list(patterns.items())
    total = sum(patterns.values())
    for _ in range(iterations):
        counts = [[0.01] * _levels(i) for i in range(len(names))]
        matched = 0.0
        for pattern, count in items:
            pm, pu = prior, 1.0 - prior
            for i in used:
                level = pattern[i]
                if level is not None:
                    pm *= m[names[i]][level]
                    pu *= u[names[i]][level]
            share = pm / (pm + pu) * count
            matched += share
            for i in used:
                if pattern[i] is not None:
                    counts[i][pattern[i]] += share
        prior = min(max(matched / total, FLOOR), 1 - FLOOR)
        if learn_m:
            m = {name: (_normalise(counts[i]) if name not in ignore else m[name]) for i, name in enumerate(names)}
    return prior, m


def train(records: Sequence[Features], *, seed: int = 1, sample: int = 200_000, u_pairs: int = 200_000,
          max_block: int = 50, iterations: int = 40) -> Model:
    """A model estimated from (a seeded sample of) `records`."""
    rng = random.Random(seed)
    records = list(records)
    held = len(records)
    if len(records) > sample:
        records = rng.sample(records, sample)
    u = estimate_u(records, u_pairs, rng)
    estimates: dict[str, list[list[float]]] = {c.name: [] for c in COMPARISONS}
    for prefix, blocked_on in SESSIONS.items():
        patterns = blocked_vectors(records, max_block, prefix)
        if not patterns:
            raise ValueError("no candidate pairs to learn from: give more records")
        _, m = expectation_maximisation(patterns, u, iterations, ignore=blocked_on)
        for name in estimates:
            if name not in blocked_on:
                estimates[name].append(m[name])
    m = {name: _normalise([sum(level) for level in zip(*found)]) for name, found in estimates.items()}
    patterns = blocked_vectors(records, max_block)
    blocked_prior, _ = expectation_maximisation(patterns, u, iterations, m=m)
    expected_matches = blocked_prior * sum(patterns.values())
    prior = min(expected_matches / (len(records) * (len(records) - 1) / 2), 0.5)
    return Model(prior=prior, m=m, u=u, trained_on={
        "records": len(records), "held": held, "random_pairs": u_pairs, "blocked_pairs": sum(patterns.values()),
        "seed": seed, "iterations": iterations, "sessions": {k: list(v) for k, v in SESSIONS.items()}})


def due(held: int, latest: Model, min_records: int, growth: float) -> bool:
    """Whether to train again: a first model once `min_records` are held, then each time the
    records held have grown by `growth` (1.0: doubled) since the latest model was trained — so
    training costs, summed over a growing store, stay proportional to its size."""
    if min_records <= 0 or held < min_records:
        return False
    if not latest.version:  # the shipped default: not trained on these records
        return True
    return held >= latest.trained_on.get("held", latest.trained_on.get("records", 0)) * (1 + growth)
