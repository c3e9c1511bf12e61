"""How two records are compared, field by field, as small declarations (the Splink way).

A `Comparison` names a field and lists its *levels*, most similar first; each level is a label
and a test on the two values. A pair of records gets, per comparison, the index of the first level
whose test passes, or None when either value is missing (no evidence either way). The comparison
vector is what the Fellegi–Sunter model (identity/model.py) turns into a match weight; the level
labels are what explanations show.

Names are compared in the orientation that fits best, so a record with first and last name
swapped is compared name-to-name rather than first-to-first.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

from rapidfuzz.distance import DamerauLevenshtein, JaroWinkler, Levenshtein

from identity.features import Features

Test = Callable[[str, str], bool]


@dataclass(frozen=True)
class Level:
    label: str
    test: Test


@dataclass(frozen=True)
class Comparison:
    name: str
    value: Callable[[Features, bool], Optional[str]]  # (record, names swapped?) -> value
    levels: tuple[Level, ...]
    # term-frequency adjustment (Splink's): at these levels the shared value of this feature field
    # weighs by how rare it is — a rare surname or postcode counts more than a common one
    frequency: str | None = None
    frequency_levels: tuple[int, ...] = (0,)

    def level(self, a: Features, b: Features, swapped: bool) -> int | None:
        x, y = self.value(a, False), self.value(b, swapped)
        if x is None or y is None:
            return None
        for i, level in enumerate(self.levels):
            if level.test(x, y):
                return i
        return len(self.levels)  # never reached: the last level is `anything_else`

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(level.label for level in self.levels)


# -- levels --------------------------------------------------------------------------------------

def exact() -> Level:
    return Level("exact", lambda x, y: x == y)


def jaro_winkler(threshold: float) -> Level:
    return Level(f"jaro_winkler>={threshold}",
                 lambda x, y: JaroWinkler.normalized_similarity(x, y, score_cutoff=threshold) >= threshold)


def edits(limit: int) -> Level:
    return Level(f"edits<={limit}", lambda x, y: Levenshtein.distance(x, y, score_cutoff=limit) <= limit)


def transpositions(limit: int) -> Level:
    """Damerau–Levenshtein: two swapped neighbours (4086030 / 4086300) count as one edit."""
    return Level(f"damerau<={limit}",
                 lambda x, y: DamerauLevenshtein.distance(x, y, score_cutoff=limit) <= limit)


def day_month_swapped() -> Level:
    return Level("day_month_swapped", lambda x, y: x[:4] == y[:4] and x[5:7] == y[8:10] and x[8:10] == y[5:7])


@lru_cache(maxsize=1)
def _name_groups() -> dict[str, frozenset[int]]:
    """Each name -> the groups (a formal name and its nicknames) it belongs to, from the curated
    `nicknames` list (carltonnorthern/nicknames, Apache-2.0)."""
    from nicknames import name_triplets

    groups: dict[str, int] = {}
    members: dict[str, set[int]] = {}
    for t in name_triplets():
        group = groups.setdefault(t.name1, len(groups))
        members.setdefault(t.name1, set()).add(group)
        members.setdefault(t.name2, set()).add(group)
    return {name: frozenset(g) for name, g in members.items()}


@lru_cache(maxsize=65536)
def _nicknames(x: str, y: str) -> bool:
    groups = _name_groups()
    return bool(groups.get(x, frozenset()) & groups.get(y, frozenset()))


def nickname() -> Level:
    """Bob and Robert, Liz and Elizabeth, Bob and Rob: one is a diminutive of the other, or both of one name."""
    return Level("nickname", _nicknames)


def same_prefix(chars: int, label: str) -> Level:
    return Level(label, lambda x, y: x[:chars] == y[:chars])


def outward_code_equal() -> Level:
    """UK postcodes (first '|'-part) share the outward code: all but the last three characters."""
    def test(x: str, y: str) -> bool:
        px, py = x.partition("|")[0], y.partition("|")[0]
        return len(px) > 3 and px[:-3] == py[:-3]
    return Level("outward_code", test)


def same_local_part() -> Level:
    return Level("same_local_part", lambda x, y: x.partition("@")[0] == y.partition("@")[0])


def parts_equal(label: str, *parts: int) -> Level:
    """The listed parts of two '|'-joined values are equal and present."""
    def test(x: str, y: str) -> bool:
        xs, ys = x.split("|"), y.split("|")
        return all(xs[i] and xs[i] == ys[i] for i in parts)
    return Level(label, test)


def anything_else() -> Level:
    return Level("else", lambda x, y: True)


# -- values ---------------------------------------------------------------------------------------

def _first(f: Features, swapped: bool) -> str | None:
    return f.last if swapped else f.first


def _last(f: Features, swapped: bool) -> str | None:
    return f.first if swapped else f.last


def _field(name: str) -> Callable[[Features, bool], Optional[str]]:
    index = Features._fields.index(name)
    return lambda f, swapped: f[index]


def _contact(f: Features, swapped: bool) -> str | None:
    """Where the person lives and answers: 'postcode|number|street|phone'."""
    if not (f.postcode or f.phone):
        return None
    return f"{f.postcode or ''}|{f.number or ''}|{f.street or ''}|{f.phone or ''}"


# -- the comparisons the matcher uses -------------------------------------------------------------

NAME_LEVELS = (exact(), jaro_winkler(0.92), jaro_winkler(0.8), anything_else())

COMPARISONS: tuple[Comparison, ...] = (
    Comparison("first_name", _first, (exact(), nickname(), jaro_winkler(0.92), jaro_winkler(0.8), anything_else())),
    Comparison("last_name", _last, NAME_LEVELS, frequency="last"),
    Comparison("date_of_birth", _field("dob"),
               (exact(), day_month_swapped(), edits(1), same_prefix(4, "same_year"), anything_else())),
    # Address and phone in one comparison: a household shares both, and counting them as
    # independent fields would add their weights up to a match between family members.
    Comparison("address_phone", _contact, (
        parts_equal("address_and_phone", 0, 1, 2, 3), parts_equal("address", 0, 1, 2),
        parts_equal("street", 1, 2), parts_equal("phone", 3), parts_equal("postcode", 0), outward_code_equal(),
        anything_else()),
        frequency="postcode", frequency_levels=(4,)),
    Comparison("email", _field("email"), (exact(), same_local_part(), anything_else()), frequency="email"),
    Comparison("national_id", _field("national_id"), (exact(), transpositions(1), transpositions(2), anything_else()),
               frequency="national_id"),
)


def names_swapped(a: Features, b: Features) -> bool:
    """Whether b's first and last name fit a's better the other way round."""
    if not (a.first and a.last and b.first and b.last) or (a.first == b.first or a.last == b.last):
        return False
    sim = JaroWinkler.normalized_similarity
    return sim(a.first, b.last) + sim(a.last, b.first) > sim(a.first, b.first) + sim(a.last, b.last) + 0.1


def oriented(a: Features, b: Features) -> tuple[Features, Features, bool]:
    """(a, b, whether b's names are read swapped), the same whichever record came first: when names
    are swapped it is always the later-sorting record whose names are turned round, so comparing
    a with b and b with a gives the same levels (the clusters must not depend on arrival order)."""
    if not names_swapped(a, b):
        return a, b, False
    if (a.first, a.last) > (b.first, b.last):
        a, b = b, a
    return a, b, True


def vector(a: Features, b: Features, comparisons: tuple[Comparison, ...] = COMPARISONS) -> tuple[int | None, ...]:
    """The comparison vector of a pair: one level index (or None) per comparison."""
    a, b, swapped = oriented(a, b)
    return tuple(c.level(a, b, swapped) for c in comparisons)


# A shared phone links two records on its own only when nothing says they are different people
# (families share phones): first names and dates of birth may be missing or close, not different.
# comparison -> the last level still acceptable (names: jaro_winkler>=0.8; dates: one edit).
PHONE_COMPATIBLE = {"first_name": 3, "date_of_birth": 2}
_BY_NAME = {c.name: c for c in COMPARISONS}


def compatible(a: Features, b: Features, limits: dict[str, int] = PHONE_COMPATIBLE) -> bool:
    a, b, swapped = oriented(a, b)
    for name, worst in limits.items():
        level = _BY_NAME[name].level(a, b, swapped)
        if level is not None and level > worst:
            return False
    return True


_FREQUENCY = tuple((i, c.frequency, frozenset(c.frequency_levels)) for i, c in enumerate(COMPARISONS) if c.frequency)


def shared_values(vec: tuple[int | None, ...], a: Features, b: Features) -> list[tuple[int, str, str]]:
    """(comparison index, feature field, value) for each comparison with a term-frequency
    adjustment whose level in `vec` says the two records share the value."""
    out = []
    for i, field, levels in _FREQUENCY:
        if vec[i] in levels:
            value = getattr(a, field)
            if field == "last" and value not in (b.last, b.first):  # names compared swapped
                value = a.first
            if value is not None:
                out.append((i, field, value))
    return out
