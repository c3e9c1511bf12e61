"""The profile API reads each customer's document (projections/documents.py): what it answers over
a real socket must be what the view's tables say (the profile assembled from them, as the API
answered before documents), for every customer, every unit's key and every merged-away id, and a
look-up after an update, merge, split, consent change or erasure must show the new state."""
from __future__ import annotations

import shutil

import orjson
import pytest

from projections import profiles
from projections.projector import connect
from tests.events import event, write
from tests.serving import cloudevent, console_session, console_split, new_keys, start_server, wait_until
from tests.test_serve import settled


def expected(con, ref: str, unit: str | None) -> tuple[int, dict | None]:
    """What GET /v1/profiles/{ref} must answer for a reader of `unit`, from the tables themselves."""
    id_type, _, value = ref.partition(":")
    found = profiles.find(con, id_type, value, unit)
    if not found:
        return 404, None
    body = profiles.assembled(con, found[0].customer_id, unit)
    if found[0].merged_from:
        body["merged_from"] = found[0].merged_from
        body["note"] = f"customer {found[0].merged_from} was merged into {found[0].customer_id}"
    return 200, orjson.loads(orjson.dumps(body, default=str))


def answers(server, key: str, refs: list[str]) -> dict[str, tuple[int, dict]]:
    with server.client(key) as client:
        return {ref: (lambda r: (r.status_code, r.json()))(client.get(f"/v1/profiles/{ref}")) for ref in refs}


def compare(view, answered: dict[str | None, dict[str, tuple[int, dict]]]) -> None:
    """Every answer (per unit, None: the group) equals what the tables say; a 404's body aside."""
    con = connect(view, read_only=True)
    try:
        for unit, by_ref in answered.items():
            for ref, (status, body) in by_ref.items():
                want_status, want = expected(con, ref, unit)
                assert status == want_status, (unit, ref, body)
                if want is not None:
                    assert body == want, (unit, ref)
        # and no document is missing or left over
        assert con.execute("SELECT count(*) FROM customers").fetchall() == \
            con.execute("SELECT count(*) FROM profile_documents").fetchall()
    finally:
        con.close()


def test_every_profile_answers_what_the_tables_say(demo_view, cdp_at, tmp_path) -> None:
    """The demo's customers (merges, several units, consent given and withdrawn, profiling withheld)
    by customer id for the group and for each unit's reader, by e-mail, and their merged-away ids."""
    home = tmp_path / "home"
    shutil.copytree(demo_view.home, home)
    cdp = cdp_at(home, CDP_SCORE_INTERVAL="3600")
    cdp("ingest", str(write(tmp_path / "bridges.jsonl", [  # records that prove customers one, in a chain
        event("m1", "retail", "RX1", customer={"email": "x1@example.org"}),
        event("m2", "telecom", "TX1", customer={"phone": "07911 123555"}),
        event("m3", "bank", "BX1", customer={"national_id": "XY123456Z"}),
        event("m4", "bank", "BX2", customer={"email": "x1@example.org", "phone": "07911123555"}),
        event("m5", "retail", "RX2", customer={"email": "x1@example.org", "national_id": "XY 12 34 56 Z"}),
        event("m6", "retail", "RX2", "cdp.consent", purpose="profiling", granted=False),
    ])))
    con = connect(home / "view.duckdb", read_only=True)
    try:
        ids = [r[0] for r in con.execute("SELECT customer_id FROM customers ORDER BY 1").fetchall()]
        absorbed = [r[0] for r in con.execute("SELECT absorbed_id FROM customer_redirects ORDER BY 1").fetchall()]
        emails = [r[0] for r in con.execute("SELECT email FROM customers WHERE email IS NOT NULL ORDER BY 1 LIMIT 60")
                  .fetchall()]
        units = [r[0] for r in con.execute("SELECT DISTINCT business_unit FROM customer_sources ORDER BY 1").fetchall()]
        withheld = con.execute("SELECT count(*) FROM customers WHERE scores_withheld").fetchall()[0][0]
        several = con.execute("SELECT count(*) FROM customers WHERE len(business_units) > 1").fetchall()[0][0]
    finally:
        con.close()
    assert absorbed and withheld and several and len(units) > 1  # the cases this test is about are there
    keys = new_keys(cdp.env, {"read": ("read", None), **{u: ("read", u) for u in units}})
    server = start_server(cdp.env, tmp_path / "serve.log")
    try:
        by_id = [f"customer_id:{cid}" for cid in ids + absorbed]
        answered = {None: answers(server, keys["read"], by_id + [f"email:{e}" for e in emails])}
        answered.update({unit: answers(server, keys[unit], by_id) for unit in units})
    finally:
        server.stop()
    group = answered[None]
    assert any(body.get("merged_from") for _, body in group.values())
    assert any(status == 200 and body["metrics"]["scores_withheld"] and body["metrics"]["rfm_segment"] is None
               for status, body in group.values())
    assert all(status in (200, 404) for by_ref in answered.values() for status, _ in by_ref.values())
    compare(home / "view.duckdb", answered)


@pytest.fixture
def readers(cdp, tmp_path):
    keys = new_keys(cdp.env, {"retail": ("publish", "retail"), "bank": ("publish", "bank"), "read": ("read", None),
                              "retail_read": ("read", "retail"), "bank_read": ("read", "bank"),
                              "admin": ("admin", None)})
    server = start_server({**cdp.env, "CDP_SCORE_INTERVAL": "1"}, tmp_path / "serve.log")
    yield server, keys
    server.stop()


def publish(server, key: str, *events: dict) -> None:
    with server.client(key) as client:
        sent = client.post("/events", json=list(events), headers={"Content-Type": "application/cloudevents-batch+json"})
        assert sent.status_code == 200, sent.text


def test_a_look_up_after_each_change_shows_the_new_state(readers, cdp) -> None:
    server, keys = readers
    read = server.client(keys["read"])
    get = lambda ref, key=keys["read"]: server.client(key).get(f"/v1/profiles/{ref}")  # noqa: E731
    publish(server, keys["retail"],
            cloudevent("e1", "retail", "R1", customer={"email": "ann@example.org", "first_name": "Ann"}),
            cloudevent("e2", "retail", "R1", "cdp.purchase", order_id="o1", amount=20.0, currency="EUR"))
    publish(server, keys["bank"], cloudevent("e3", "bank", "B1", customer={"phone": "+447700900123",
                                                                           "last_name": "Lee"}))
    settled(server, keys["read"])
    ann = read.get("/v1/profiles/email:ann@example.org").json()
    lee = read.get("/v1/profiles/bank:B1").json()
    assert ann["customer_id"] != lee["customer_id"] and "last_name" not in ann["golden_record"]

    # an update to the profile
    publish(server, keys["retail"], cloudevent("e4", "retail", "R1", customer={"first_name": "Anna"}))
    settled(server, keys["read"])
    assert read.get("/v1/profiles/retail:R1").json()["golden_record"]["first_name"]["value"] == "Anna"

    # a record that bridges both merges them: the absorbed id answers with the survivor
    publish(server, keys["bank"], cloudevent("e5", "bank", "B1", customer={"email": "ann@example.org"}))
    settled(server, keys["read"])
    merged = read.get("/v1/profiles/email:ann@example.org").json()
    absorbed = {ann["customer_id"], lee["customer_id"]} - {merged["customer_id"]}
    assert len(absorbed) == 1 and [m["absorbed_id"] for m in merged["merges"]] == list(absorbed)
    assert {s["business_unit"] for s in merged["sources"]} == {"retail", "bank"}
    assert merged["golden_record"]["last_name"]["value"] == "Lee"
    moved = read.get(f"/v1/profiles/customer_id:{absorbed.pop()}").json()
    assert moved["customer_id"] == merged["customer_id"] and moved["merged_from"]
    # each unit's reader sees the merged customer with its own records only
    for unit in ("retail", "bank"):
        own = get(f"customer_id:{merged['customer_id']}", keys[f"{unit}_read"]).json()
        assert {s["business_unit"] for s in own["sources"]} == {unit} and own["merges"] == []

    # consent to profiling withdrawn: shown at once; the scores go with the next refresh
    publish(server, keys["retail"], cloudevent("e6", "retail", "R1", "cdp.consent", purpose="profiling",
                                               granted=False))
    settled(server, keys["read"])
    assert [(c["purpose"], c["granted"]) for c in read.get("/v1/profiles/retail:R1").json()["consent"]] == \
        [("profiling", False)]
    wait_until(lambda: read.get("/v1/profiles/retail:R1").json()["metrics"]["scores_withheld"] is True, 30,
               "the scores withheld")
    assert read.get("/v1/profiles/retail:R1").json()["metrics"]["rfm_segment"] is None

    # a record split off is a customer of its own again
    with console_session(server, keys["admin"]) as browser:
        assert console_split(browser, merged["customer_id"], "bank:B1").status_code == 303
    settled(server, keys["read"])
    wait_until(lambda: read.get("/v1/profiles/bank:B1").json()["customer_id"] != merged["customer_id"], 30,
               "the split to show")
    assert {s["business_unit"] for s in read.get("/v1/profiles/retail:R1").json()["sources"]} == {"retail"}
    assert get("customer_id:" + merged["customer_id"], keys["bank_read"]).status_code == 404

    # erased: gone for everyone
    assert server.client(keys["admin"]).delete("/v1/profiles/retail:R1").status_code == 200
    settled(server, keys["read"])
    assert get("customer_id:" + merged["customer_id"]).status_code == 404
    assert get("email:ann@example.org", keys["retail_read"]).status_code == 404
    refs = ["bank:B1", "retail:R1", "email:ann@example.org", f"customer_id:{merged['customer_id']}"]
    answered = {None: answers(server, keys["read"], refs), "bank": answers(server, keys["bank_read"], refs)}
    server.stop()
    compare(cdp.home / "view.duckdb", answered)
