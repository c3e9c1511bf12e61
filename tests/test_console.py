"""The customer-360 console in a real headless Chromium (Debian's `chromium`, driven by Playwright)
against `cdp serve` on the demo's 400 people: what an agent, a steward and an attacker would do."""
from __future__ import annotations

import json
import os
import re
import shutil

import httpx
import phonenumbers
import pytest

from tests.serving import cloudevent, new_keys, start_server, wait_until

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra: make install")


def _chromium() -> str:
    found = shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium")
    if not found:
        message = "chromium not installed: scripts/test.sh installs it (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _misspelt(word: str) -> str:
    """Two letters after the first swapped: 'Smith' -> 'Simth'."""
    return word[0] + word[2] + word[1] + word[3:] if len(word) > 3 and word[1] != word[2] else word + "e"


@pytest.fixture(scope="module")
def console(tmp_path_factory, demo_files, cdp_at):
    """The demo ingested, keys made, facts picked from the view before `cdp serve` takes it over."""
    home = tmp_path_factory.mktemp("console")
    # a strict match threshold and a low review one, so the demo leaves pairs for a person to judge
    cdp = cdp_at(home / "home", CDP_MATCH_THRESHOLD="0.999", CDP_REVIEW_THRESHOLD="0.3")
    cdp("ingest", *map(str, demo_files.event_files))
    facts = {
        "both": cdp.query("""
            SELECT customer_id, email, first_name, last_name, business_units FROM customers
            WHERE len(business_units) = 2 AND orders > 0 AND first_name IS NOT NULL AND length(last_name) > 4
              AND email IS NOT NULL AND sources = 2
              AND (SELECT count(*) FROM customers d WHERE d.last_name = customers.last_name) = 1
            ORDER BY customer_id LIMIT 1""")[0],
        "bank_only": cdp.query("""
            SELECT customer_id, email FROM customers WHERE business_units = ['bank'] AND email IS NOT NULL
            ORDER BY customer_id LIMIT 1""")[0],
        "phoned": cdp.query("""SELECT customer_id, phone FROM customers WHERE phone IS NOT NULL
                               ORDER BY customer_id LIMIT 1""")[0],
        "review": json.loads(cdp("identity", "review", "--format", "json").stdout),
    }
    # a person no other test reads or judges: the one the erasure test erases
    taken = {facts["both"]["customer_id"], facts["bank_only"]["customer_id"], facts["phoned"]["customer_id"],
             *(p[c] for p in facts["review"] for c in ("customer_id", "other_customer_id"))}
    facts["erasable"] = next(r for r in cdp.query("""
        SELECT customer_id, email, last_name FROM customers WHERE email IS NOT NULL AND last_name IS NOT NULL
        ORDER BY customer_id DESC LIMIT 50""") if r["customer_id"] not in taken)
    facts["order"] = cdp.query(f"""
        SELECT order_id FROM customer_events WHERE customer_id = '{facts['both']['customer_id']}'
          AND type = 'cdp.purchase' ORDER BY time DESC LIMIT 1""")[0]["order_id"]
    keys = new_keys(cdp.env, {"admin": ("admin", None), "read": ("read", None), "retail": ("read", "retail"),
                              "publish": ("publish", "retail")})
    facts["cdp"], facts["env"] = cdp, {**cdp.env, "CDP_RATE_LIMIT": "1000"}
    servers = [start_server(facts["env"], home / "serve.log")]
    facts["servers"] = servers  # the restart test replaces the server
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        yield servers[0], keys, facts, browser
        browser.close()
    servers[-1].stop()


def signed_in(browser, server, key: str):
    context = browser.new_context(base_url=server.url)
    page = context.new_page()
    page.goto("/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(server.url + "/")
    assert key not in page.url
    return context, page


def search(page, q: str) -> None:
    page.get_by_label("Find a customer").fill(q)
    page.get_by_role("button", name="Search").click()
    page.wait_for_load_state()


def test_agent_signs_in_searches_and_reads_a_customer(console) -> None:
    server, keys, facts, browser = console
    both = facts["both"]
    context, page = signed_in(browser, server, keys["read"])
    cookie = {c["name"]: c for c in context.cookies()}["cdp_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and keys["read"] not in cookie["value"]

    search(page, both["email"].upper())
    assert page.locator("table.results tbody tr").count() == 1
    misspelt = f"{both['first_name']} {_misspelt(both['last_name'])}"
    search(page, misspelt)
    link = page.get_by_role("link", name=f"{both['first_name']} {both['last_name']}")
    assert link.count() >= 1, f"{misspelt!r} did not find {both}"

    # a phone number in the formats ingest accepts: spaced international, a tel: URI, dotted
    phoned = facts["phoned"]
    number = phonenumbers.parse(phoned["phone"])
    for typed in (phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL),
                  phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.RFC3966),
                  phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164).replace("+", "00")):
        search(page, typed)
        assert page.locator(f"table.results a[href='/customers/{phoned['customer_id']}']").count() == 1, typed

    # type-ahead: a few letters offer the customer; arrow down and Enter open it
    page.goto("/")
    box = page.get_by_label("Find a customer")
    box.press_sequentially(both["email"], delay=20)
    page.wait_for_selector("#suggestions li")
    box.press("ArrowDown")
    box.press("Enter")
    page.wait_for_url(f"{server.url}/customers/{both['customer_id']}")

    records = page.locator(".record")
    assert {r.get_attribute("data-record").split(":")[0] for r in records.all()} == set(both["business_units"])
    assert page.locator("ol.timeline .cdp-purchase", has_text=facts["order"]).count() == 1
    times = page.locator("ol.timeline time").evaluate_all("els => els.map(e => e.getAttribute('datetime'))")
    assert times == sorted(times, reverse=True)
    for label in ("Lifetime value", "Predicted 12-month value", "RFM segment", "Churn risk", "Preferred channel"):
        assert page.locator("dl.tiles dt", has_text=label).count() == 1
    assert page.locator("#churn-drivers").inner_text().strip()
    page.set_viewport_size({"width": 390, "height": 800})  # a phone: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.set_viewport_size({"width": 1280, "height": 800})
    # filter by type
    page.get_by_label("Type").select_option("cdp.purchase")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    kinds = set(page.locator("ol.timeline .tag").all_inner_texts())
    assert kinds == {"purchase"}
    # a read key sees no split button and may not split
    assert page.get_by_role("link", name="Split off…").count() == 0
    refused = page.request.get(f"/customers/{both['customer_id']}/split?record=x:y")
    assert refused.status == 403

    # a dashboard drawn live
    page.goto("/dashboard")
    assert page.locator("svg.chart").count() == 5

    # sign-out ends the session, even for a copy of the cookie
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(server.url + "/login")
    page.goto("/")
    assert page.url == server.url + "/login"
    stolen = httpx.get(server.url + "/", cookies={"cdp_session": cookie["value"]}, follow_redirects=False)
    assert stolen.status_code == 303 and stolen.headers["location"] == "/login"
    context.close()


def test_unit_key_sees_only_its_units_customers(console) -> None:
    server, keys, facts, browser = console
    context, page = signed_in(browser, server, keys["retail"])
    search(page, facts["bank_only"]["email"])
    assert page.locator("table.results tbody tr").count() == 0
    assert page.get_by_text("No customer found").count() == 1
    response = page.goto(f"/customers/{facts['bank_only']['customer_id']}")
    assert response.status == 404
    assert page.get_by_role("link", name="Review").count() == 0
    assert page.request.get("/review").status == 403
    context.close()


def test_refusals_bad_keys_and_csrf(console) -> None:
    server, keys, facts, browser = console
    context = browser.new_context(base_url=server.url)
    page = context.new_page()
    page.goto("/login")
    for wrong in ("cdp_read_group_" + "x" * 32, keys["publish"]):
        page.get_by_label("API key").fill(wrong)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_load_state()
        assert page.url == server.url + "/login" and page.locator(".error").count() == 1
    # a sign-in posted without the form's nonce, and a form posted without its CSRF token
    assert page.request.post("/login", form={"key": keys["admin"]}).status == 403
    context.close()
    context, page = signed_in(browser, server, keys["admin"])
    both = facts["both"]
    record = f"{both['business_units'][0]}:x"
    for path, form in (("/logout", {}), (f"/customers/{both['customer_id']}/split", {"record": record}),
                       (f"/customers/{both['customer_id']}/erase", {"suppress": "yes"}),
                       ("/review/abc", {"action": "confirm"})):
        refused = page.request.post(path, form=form, max_redirects=0)
        assert refused.status == 403 and "CSRF" in refused.text(), path
        forged = page.request.post(path, form={**form, "csrf": "forged"}, max_redirects=0)
        assert forged.status == 403, path
    page.goto("/")
    assert page.url == server.url + "/"  # still signed in: the forged sign-out did nothing
    assert httpx.get(server.url + "/customers/" + both["customer_id"], follow_redirects=False).status_code == 303
    context.close()


def test_steward_confirms_a_review_pair_and_splits_a_record(console) -> None:
    server, keys, facts, browser = console
    assert facts["review"], "the demo has a grey-zone pair"
    pair = facts["review"][0]
    context, page = signed_in(browser, server, keys["admin"])
    page.goto("/review")
    card = page.locator(f"[data-review='{pair['review_id']}']")
    assert card.locator("table.compare tbody tr").count() >= 2
    card.get_by_role("button", name="Same person: merge").click()
    page.wait_for_url(server.url + "/review")
    flash = page.locator(".flash").inner_text()
    assert "Confirmed" in flash and pair["record"] in flash
    survivor = flash.rstrip(".").split()[-1]
    assert page.locator(f"[data-review='{pair['review_id']}']").count() == 0
    absorbed = ({pair["customer_id"], pair["other_customer_id"]} - {survivor}).pop()
    page.goto(f"/customers/{absorbed}")
    assert page.url.startswith(f"{server.url}/customers/{survivor}")
    assert page.get_by_text(f"Customer {absorbed} was merged into this customer").count() == 1
    shown = {r.get_attribute("data-record") for r in page.locator(".record").all()}
    assert {pair["record"], pair["other_record"]} <= shown

    # split the other record off again, through the confirmation step
    page.locator(f".record[data-record='{pair['other_record']}']").get_by_role("link", name="Split off…").click()
    page.get_by_role("button", name=f"Split {pair['other_record']} off").click()
    page.wait_for_url(f"{server.url}/customers/{survivor}")
    assert f"{pair['other_record']} → new customer" in page.locator(".flash").inner_text()
    assert pair["other_record"] not in {r.get_attribute("data-record") for r in page.locator(".record").all()}
    new_customer = page.locator(".flash").inner_text().rstrip(".").split()[-1]
    page.goto(f"/customers/{new_customer}")
    assert [r.get_attribute("data-record") for r in page.locator(".record").all()] == [pair["other_record"]]
    context.close()


def test_dashboard_follows_the_view_while_open(console) -> None:
    server, keys, facts, browser = console
    context, page = signed_in(browser, server, keys["read"])
    page.goto("/dashboard")
    shown = page.locator("#live").get_attribute("data-shown")
    customers = page.locator(".kpi", has_text="customers").first.locator(".v").inner_text()
    newcomer = cloudevent("console-live-1", "retail", "console-newcomer", customer={"email": "newcomer@example.org"})
    answer = server.client(keys["publish"]).post("/events", json=newcomer,
                                                 headers={"content-type": "application/cloudevents+json"})
    assert answer.status_code == 200, answer.text
    def customers_shown() -> int:
        return int(page.locator(".kpi", has_text="customers").first.locator(".v").inner_text().replace(",", ""))

    # the open page swaps in charts drawn at the newer position, without a reload
    wait_until(lambda: customers_shown() == int(customers.replace(",", "")) + 1, 60, "the newcomer on the dashboard")
    assert int(page.locator("#live").get_attribute("data-shown")) > int(shown)
    context.close()


def test_a_data_protection_officer_downloads_what_is_held_and_erases_the_person(console) -> None:
    """The person's two rights from their page: everything held as a zip (any key that may read
    them), and the erasure behind a confirmation (a group-wide admin key), both audited. After the
    dashboard's test, whose count of customers an erasure would move."""
    import zipfile

    server, keys, facts, browser = console
    person = facts["erasable"]
    cid = person["customer_id"]
    context, page = signed_in(browser, server, keys["read"])
    page.goto(f"/customers/{cid}")
    assert page.get_by_role("link", name="Erase this person…").count() == 0
    assert page.request.get(f"/customers/{cid}/erase").status == 403
    context.close()

    context, page = signed_in(browser, server, keys["admin"])
    page.goto(f"/customers/{cid}")
    with page.expect_download() as download:
        page.get_by_role("link", name="Download everything held (zip)").click()
    archive = zipfile.ZipFile(download.value.path())
    held = json.loads(archive.read("customer.json"))
    assert held["customer_id"] == cid and held["golden_record"]["email"] == person["email"]
    assert held["events"] and {"events.csv", "source_records.csv", "rejected_inputs.csv"} <= set(archive.namelist())

    page.get_by_role("link", name="Erase this person…").click()
    assert page.get_by_label("Keep their identifiers as keyed hashes").is_checked()
    page.get_by_role("button", name=re.compile("^Erase ")).click()
    page.wait_for_url(server.url + "/")
    flash = page.locator(".flash").inner_text()
    assert f"Erased customer {cid}" in flash and "identifiers suppressed" in flash
    assert page.goto(f"/customers/{cid}").status == 404
    page.goto("/")
    search(page, person["email"])
    assert page.get_by_text("No customer found").count() == 1
    context.close()
    entries = httpx.get(server.url + "/v1/audit", params={"customer": cid},
                        headers={"Authorization": f"Bearer {keys['admin']}"}).json()["entries"]
    assert [(e["action"], e["detail"].get("via")) for e in entries if e["action"] != "read"] == [
        ("export", "console"), ("erase", None)]


def test_sessions_survive_a_restart_and_end_when_the_key_is_revoked(console) -> None:
    """Runs last: it restarts the module's server."""
    server, keys, facts, browser = console
    made = facts["cdp"]("keys", "create", "--scope", "read")
    token, key_id = made.stdout.strip().splitlines()[-1], re.search(r"key (\w+)", made.stderr)[1]
    wait_until(lambda: server.client(token).get("/metrics").status_code == 200, 10, "the server to know the new key")
    context, page = signed_in(browser, server, token)
    other, other_page = signed_in(browser, server, token)  # a second session of the same key
    stored = (facts["env"]["CDP_HOME"] + "/console-sessions.sqlite")
    assert token.encode() not in open(stored, "rb").read()

    port = int(server.url.rsplit(":", 1)[1])
    server.stop()
    again = start_server(facts["env"], server.log, port=port)
    facts["servers"].append(again)
    page.goto("/")
    assert page.url == again.url + "/" and page.get_by_label("Find a customer").count() == 1

    facts["cdp"]("keys", "revoke", key_id)

    def signed_out() -> bool:
        page.goto("/")
        return page.url == again.url + "/login"

    wait_until(signed_out, 10, "the revoked key's session to end")
    other_page.goto("/")
    assert other_page.url == again.url + "/login"  # every session of the key, not only the one that noticed
    context.close()
    other.close()
