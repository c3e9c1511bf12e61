"""Re-resolution: what a new model (or new thresholds) changes about the customers already held.

Streaming resolution decides each record once, with the model of its day. When the model changes,
the records already held are resolved again *as a whole*: every pair the blocking indexes find is
scored with the new model, the links are gathered — the deterministic rules (shared national id,
e-mail, loyalty id within their guardrails; a shared phone with compatible first name and date of
birth), the pairs people confirmed, and every scored pair at or above the match threshold — and
their transitive closure, with every remembered do-not-link pair honoured, is the *target*
clustering. It does not depend on the order the records arrived in.

The difference between today's customers and the target is a `Plan` of splits and merges that
the pipeline appends as ordinary identity events (nothing is rewritten):

* a customer whose records fall into several target clusters is split; the part holding the record
  the customer was founded on (else the largest part) keeps the id;
* the parts that land in one target cluster merge; the survivor is the oldest existing customer
  (`oldest`, from the store), so ids stay stable and absorbed ids keep resolving;
* each merge carries the link that joined it (its rule and field-by-field evidence) and the model
  version; each split names the model version and threshold in its reason.

Decisions people made are inputs, never outputs: splits and rejected reviews are do-not-link pairs
no link may cross, confirmed reviews are links. Applying a plan and planning again with the same
model and thresholds gives an empty plan.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from identity.comparisons import compatible
from identity.resolver import IDENTIFIER_RULES, Link, Resolver, new_customer_id, split_id

Progress = Callable[[int], None]


@dataclass(frozen=True)
class PlannedSplit:
    customer_id: str
    new_customer_id: str
    source_keys: list[str]
    remaining: list[str]  # the records that stay with customer_id
    reason: str


@dataclass(frozen=True)
class PlannedMerge:
    survivor: str
    absorbed: str
    link: Link


@dataclass
class Plan:
    model_version: int
    threshold: float
    customers_before: int = 0
    customers_after: int = 0
    records: int = 0
    pairs_scored: int = 0
    splits: list[PlannedSplit] = field(default_factory=list)
    merges: list[PlannedMerge] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.splits or self.merges)


@dataclass
class Retrained:
    """What training and re-resolution did (or, in a dry run, would do)."""

    model: object  # identity.model.Model
    new_model: bool  # False: retraining gave the latest model again (not stored twice)
    plan: Plan

    def describe(self) -> str:
        p = self.plan
        model = f"model v{self.model.version}" + ("" if self.new_model else " (unchanged)")
        return (f"{model}: {len(p.merges):,} merges, {len(p.splits):,} splits, "
                f"customers {p.customers_before:,} → {p.customers_after:,}")


@dataclass(frozen=True, slots=True)
class _Edge:
    a: str
    b: str
    rule: str
    evidence: dict | None  # deterministic rules and confirmations: their evidence
    scored: object = None  # probabilistic: the matcher's Scored (evidence built only when shown)


class _Clusters:
    """Union–find over source records that refuses any union a do-not-link pair forbids."""

    def __init__(self, keys: Iterable[str], cannot_link: Iterable[tuple[str, str]]):
        self.parent = {k: k for k in keys}
        self.forbidden: dict[str, set[str]] = {}
        for a, b in cannot_link:
            if a in self.parent and b in self.parent:
                self.forbidden.setdefault(a, set()).add(b)
                self.forbidden.setdefault(b, set()).add(a)

    def find(self, k: str) -> str:
        parent = self.parent
        root = k
        while parent[root] != root:
            root = parent[root]
        while parent[k] != root:
            parent[k], k = root, parent[k]
        return root

    def union(self, a: str, b: str) -> bool:
        """Joins the clusters of a and b unless a do-not-link pair spans them; True when joined."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        fa, fb = self.forbidden.get(ra), self.forbidden.get(rb)
        if fa and fb:
            small, other = (fa, rb) if len(fa) <= len(fb) else (fb, ra)
            if any(self.find(x) == other for x in small):
                return False
        if fb and len(fb) > len(fa or ()):
            ra, rb, fa, fb = rb, ra, fb, fa
        self.parent[rb] = ra
        if fb:
            self.forbidden[ra] = (fa or set()) | fb
            del self.forbidden[rb]
        return True


def _strength(identifier: tuple[str, str]) -> int:
    kind = identifier[0]
    return IDENTIFIER_RULES.index(kind) if kind in IDENTIFIER_RULES else len(IDENTIFIER_RULES)


def _deterministic_edges(resolver: Resolver, order: Sequence[str]) -> Iterable[_Edge]:
    records, guardrails = resolver.blocks.records, resolver.guardrails
    holders: dict[tuple[str, str], str] = {}
    for src in order:
        f = records[src]
        for kind, value in sorted(f.identifiers(), key=_strength):  # its later events' too, strongest first
            if kind in IDENTIFIER_RULES and guardrails.allows(kind, value):
                first = holders.setdefault((kind, value), src)
                if first != src:
                    yield _Edge(first, src, f"shared_{kind}", {kind: value})
            elif kind == "phone" and guardrails.allows(kind, value):
                for holder in resolver.blocks.blocks.get(f"ph:{value}", ()):
                    if holder != src and compatible(f, records[holder]):
                        yield _Edge(holder, src, "shared_phone", {"phone": value, "matched": holder})


@dataclass
class Scores:
    """The scored pairs at or above the match threshold, found from the records in `records`.
    Scoring is the expensive part of a re-resolution: it runs on a snapshot of the records,
    outside the writers' lock, and only the records that arrived since are scored under it."""

    edges: dict[tuple[str, str], tuple[float, _Edge]] = field(default_factory=dict)
    records: set[str] = field(default_factory=set)
    pairs: int = 0


def score(resolver: Resolver, order: Sequence[str], progress: Progress | None = None,
          into: Scores | None = None) -> Scores:
    """Scores every candidate pair the blocking indexes find for the records in `order`."""
    scores = into if into is not None else Scores()
    matcher, records, guardrails = resolver.matcher, resolver.blocks.records, resolver.guardrails
    if matcher is None:
        return scores
    threshold, edges = matcher.match_threshold, scores.edges
    step = 0
    for src in order:
        scores.records.add(src)
        for scored in matcher.compare(guardrails.screen(records[src])):
            other = scored.source_key
            scores.pairs += 1
            if other == src or scored.probability < threshold:
                continue
            pair = (src, other) if src < other else (other, src)
            if pair not in edges:
                edges[pair] = (scored.weight, _Edge(pair[0], pair[1], "probabilistic", None, scored))
        step += 1
        if progress is not None and step == 1000:
            progress(step)
            step = 0
    if progress is not None and step:
        progress(step)
    return scores


def plan(resolver: Resolver, confirmed: Iterable[tuple[str, str]] = (),
         oldest: Callable[[list[str]], str] = min, progress: Progress | None = None,
         scores: Scores | None = None) -> Plan:
    """The splits and merges that turn today's customers into the target clustering (see above).

    `confirmed` are the pairs people confirmed; `oldest` picks the oldest of several existing
    customer ids; `progress` is told how many records have been scored; `scores` are the pairs
    scored beforehand (with this resolver's model), to which the records not among them are added."""
    matcher = resolver.matcher
    model_version = getattr(matcher.model, "version", 0) if matcher is not None else 0
    threshold = matcher.match_threshold if matcher is not None else 1.0
    result = Plan(model_version=model_version, threshold=threshold)
    records = resolver.blocks.records
    order = sorted(records)
    result.records = len(order)
    clusters = _Clusters(order, resolver.cannot_link.pairs)
    accepted: list[_Edge] = []
    people = [_Edge(a, b, "review_confirmed", {"pair": [a, b]}) for a, b in confirmed if a in records and b in records]
    for edge in [*people, *_deterministic_edges(resolver, order)]:
        if clusters.union(edge.a, edge.b):
            accepted.append(edge)
    if scores is None:
        scores = score(resolver, order, progress)
    else:
        score(resolver, [src for src in order if src not in scores.records], progress, scores)
    result.pairs_scored = scores.pairs
    for _, edge in sorted(scores.edges.values(), key=lambda item: (-item[0], item[1].a, item[1].b)):
        if edge.a in records and edge.b in records and clusters.union(edge.a, edge.b):  # (erased since)
            accepted.append(edge)

    current = {src: resolver.cluster_of(src) or src for src in order}
    groups: dict[str, dict[str, list[str]]] = {}
    for src in order:
        groups.setdefault(current[src], {}).setdefault(clusters.find(src), []).append(src)
    result.customers_before = len(groups)
    pieces: dict[str, list[str]] = {}  # target cluster -> the customer ids (existing or split off) in it
    piece_of: dict[str, str] = {}
    new_ids: set[str] = set()
    for customer, parts in groups.items():
        keep = _kept_part(customer, parts)
        for target, members in parts.items():
            piece = customer
            if target != keep:
                piece = split_id(customer, members, lambda i: i in groups or i in new_ids or resolver.index.is_merged(i),
                                 "reresolve")
                new_ids.add(piece)
                result.splits.append(PlannedSplit(
                    customer, piece, members, parts[keep],
                    f"re-resolution with model v{model_version} at threshold {threshold}: "
                    f"no link to the rest of customer {customer}"))
            pieces.setdefault(target, []).append(piece)
            for src in members:
                piece_of[src] = piece
    result.customers_after = len(pieces)

    why: dict[str, _Edge] = {}
    for edge in accepted:
        pa, pb = piece_of[edge.a], piece_of[edge.b]
        if pa != pb:
            why.setdefault(pa, edge)
            why.setdefault(pb, edge)
    for ids in pieces.values():
        if len(ids) < 2:
            continue
        existing = [i for i in ids if i not in new_ids]
        survivor = oldest(existing) if existing else min(ids)
        for absorbed in sorted(ids):
            if absorbed != survivor:
                result.merges.append(PlannedMerge(survivor, absorbed, _link(why[absorbed], matcher, model_version)))
    return result


def _kept_part(customer: str, parts: dict[str, list[str]]) -> str:
    """The target cluster of the part that keeps the customer's id: the one holding the record the
    customer was founded on, else the largest."""
    for target, members in parts.items():
        for src in members:
            unit, _, source_id = src.partition(":")
            if new_customer_id(unit, source_id) == customer:
                return target
    return max(parts, key=lambda t: (len(parts[t]), t))


def _link(edge: _Edge, matcher, model_version: int) -> Link:
    evidence = dict(edge.evidence or matcher.evidence(edge.scored))
    evidence.update(pair=[edge.a, edge.b], model_version=model_version, re_resolution=True)
    return Link(edge.rule, evidence)


def apply(resolver: Resolver, changes: Plan) -> None:
    """Changes the resolver's state as the plan says (the caller records the events)."""
    index = resolver.index
    for s in changes.splits:
        for src in s.source_keys:
            index.assign("source", src, s.new_customer_id)
        resolver.move_identifiers(s.customer_id, s.new_customer_id, s.source_keys, s.remaining)
    for m in changes.merges:
        index.redirect(m.absorbed, m.survivor)
