"""Property: whatever is thrown at ingest, every good event is stored exactly once and every bad
one is dead-lettered with a reason and its input; nothing raises, nothing is lost (issue 14).

Good events carry generated values wherever the schema allows any text (names, e-mails, phones,
cities, ids, sources) and generated times and amounts inside the accepted ranges; bad ones are good
ones broken in one of the ways an attacker or a careless unit breaks them.
"""
from __future__ import annotations

import json
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
from hypothesis import HealthCheck, given, settings, strategies as st

from cdp.config import Settings
from cdp.pipeline import Pipeline
from ingest.stage import event_key
from tests.events import DEFAULT_FIELDS, event

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
ID_TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=20)
CONTROL = st.sampled_from(["\n", "\x00", "\x1b", "\r", "\x7f", "\x85"])
OFFSETS = st.integers(-14 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


def rfc3339(moment: datetime) -> str:
    text = moment.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") and moment.microsecond % 2 else text


@st.composite
def good_event(draw, number: int) -> dict:
    kind = draw(st.sampled_from(sorted(DEFAULT_FIELDS)))
    moment = draw(st.datetimes(datetime(1900, 1, 2), datetime(2026, 1, 1), timezones=OFFSETS))
    customer = {k: draw(TEXT) for k in draw(st.sets(st.sampled_from(["first_name", "last_name", "email", "phone"])))}
    if draw(st.booleans()):
        customer["address"] = {"city": draw(TEXT), "postcode": draw(TEXT)}
    fields = {}
    if kind == "cdp.purchase":
        fields = {"amount": draw(st.floats(0, 1e9)), "order_id": f"o{number}{draw(ID_TEXT)}"}
    source = draw(st.sampled_from(["retail/pos", "bank/crm", "a:b", "a"])) + draw(ID_TEXT)
    return event(f"{number}:{draw(ID_TEXT)}", draw(st.sampled_from(["retail", "bank", "telecom"])),
                 f"S{draw(ID_TEXT)}", kind, time=rfc3339(moment), source=source, customer=customer, **fields)


def _set(path: str, value):
    def apply(e: dict) -> dict:
        node = e
        *parents, last = path.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
        return e
    return apply


@st.composite
def bad_line(draw, number: int) -> bytes:
    e = draw(good_event(number))
    breaks = [
        _set("time", draw(st.sampled_from(["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00",
                                           "9000-01-01T00:00:00Z", "1899-12-31T23:59:59Z", "2024-02-30T00:00:00Z",
                                           "yesterday"]))),
        _set("id", draw(st.sampled_from(["", " ", "\t"])) if draw(st.booleans())
             else f"{number}{draw(CONTROL)}{draw(ID_TEXT)}"),
        _set("source", f"src{draw(CONTROL)}"),
        _set("data.customer.source_id", draw(st.sampled_from([" ", "a\nb", "\x00"]))),
        _set("type", "cdp." + draw(st.text("abcxyz", min_size=1, max_size=8)) + "!"),
        _set("data", draw(st.sampled_from([[], 1, "data", None]))),
        _set("data.business_unit", draw(st.sampled_from(["", "Retail Unit", 7]))),
    ]
    if e["type"] == "cdp.purchase":
        breaks.append(_set("data.amount", draw(st.sampled_from([1e308, -0.01, 1e10, -1e300]))))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.sampled_from([b"{not json", b"[]", b"null", b'"text"', b'{"id": "\xff"}']))
    return orjson.dumps(draw(st.sampled_from(breaks))(e))


@st.composite
def inputs(draw) -> tuple[list[bytes], list[dict]]:
    """Lines in a random order, and the good events among them."""
    lines, good = [], []
    for number in range(draw(st.integers(1, 15))):
        if draw(st.booleans()):
            e = draw(good_event(number))
            good.append(e)
            lines.append(orjson.dumps(e))
        else:
            lines.append(draw(bad_line(number)))
    return lines, good


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(inputs())
def test_every_good_event_is_stored_once_and_every_bad_one_dead_lettered_with_its_input(generated):
    lines, good = generated
    with tempfile.TemporaryDirectory() as directory:
        home = Path(directory)
        path = home / "input.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        with Pipeline(Settings.from_env({"CDP_HOME": str(home)}), project=False) as pipeline:
            summary = pipeline.ingest([str(path)])
            keys = [k for (k,) in pipeline.app.store.query("SELECT key FROM cdp_event_keys")]
        dead = [json.loads(x) for x in (home / "deadletter.jsonl").read_bytes().split(b"\n") if x] \
            if (home / "deadletter.jsonl").exists() else []  # JSON lines: split at \n only (names may hold U+2028)

    assert sorted(keys) == sorted(event_key(e["source"], e["id"]) for e in good)
    assert summary.accepted == len(good) and summary.duplicates == 0
    assert len(dead) == summary.rejected == len(lines) - len(good)
    good_lines = {orjson.dumps(e) for e in good}
    bad_inputs = sorted(x.decode("utf-8", errors="replace") for x in lines if x not in good_lines)
    assert sorted(entry["input"] for entry in dead) == bad_inputs
    assert all(entry["reason"] for entry in dead)
