"""Copying the view into a fresh file as the running server does after an erasure
(projections/erasure.py `copy_out`): through a connection of a database that may not write files,
which goes on answering meanwhile; every row of every table in the copy, its views, the look-up
indexes built in it; then the copy in the view's place. The copy then follows the store up to
the old view and says whether it caught up with an erasure."""
from __future__ import annotations

import shutil

import duckdb

from projections import erasure

INDEX = "CREATE INDEX IF NOT EXISTS lookup_customers ON customers (customer_id)"


def test_a_copy_holds_every_row_and_the_indexes_and_takes_the_views_place(demo_view, tmp_path):
    view = tmp_path / "view.duckdb"
    shutil.copy(demo_view.home / "view.duckdb", view)
    con = duckdb.connect(str(view))
    con.execute("CREATE VIEW big_spenders AS SELECT customer_id FROM customers WHERE lifetime_value > 100")
    con.execute("SET enable_external_access = false")  # as the server's: user SQL never reaches files
    reader = con.cursor()
    try:
        fresh = erasure.copy_out(con.cursor(), view, [INDEX])
        customers = reader.execute("SELECT count(*) FROM customers").fetchall()[0][0]  # still answering
    finally:
        con.close()
    assert customers > 100 and fresh.exists() and fresh != view

    copy = duckdb.connect(str(fresh))
    try:
        copy.execute(f"ATTACH '{view}' AS original (READ_ONLY)")
        tables = [name for (name,) in copy.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = 'original' ORDER BY 1").fetchall()]
        assert "customer_events" in tables and tables == [name for (name,) in copy.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() ORDER BY 1").fetchall()]
        for table in tables:
            counts = copy.execute(f"SELECT (SELECT count(*) FROM {table}), "
                                  f"(SELECT count(*) FROM original.{table})").fetchall()[0]
            assert counts[0] == counts[1], table
            for a, b in ((table, f"original.{table}"), (f"original.{table}", table)):
                assert copy.execute(f"SELECT count(*) FROM (FROM {a} EXCEPT ALL FROM {b})").fetchall()[0][0] == 0, table
        assert copy.execute("SELECT index_name FROM duckdb_indexes() "
                            "WHERE database_name = current_database()").fetchall() == [("lookup_customers",)]
        assert copy.execute("SELECT count(*) FROM big_spenders").fetchall() == copy.execute(
            "SELECT count(*) FROM original.big_spenders").fetchall()
    finally:
        copy.close()

    erasure.swap_in(fresh, view)
    assert not fresh.exists()
    with duckdb.connect(str(view), read_only=True) as swapped:
        assert swapped.execute("SELECT count(*) FROM customers").fetchall()[0][0] == customers


def test_a_failed_copy_leaves_no_part_behind(demo_view, tmp_path):
    view = tmp_path / "view.duckdb"
    shutil.copy(demo_view.home / "view.duckdb", view)
    con = duckdb.connect(str(view))
    try:
        try:
            erasure.copy_out(con.cursor(), view, ["CREATE INDEX broken ON customers (no_such_column)"])
        except duckdb.BinderException:
            pass
        else:
            raise AssertionError("an index on a missing column was built")
        assert con.execute("SELECT count(*) FROM customers").fetchall()[0][0] > 0  # the view is untouched
    finally:
        con.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view.duckdb"]


def test_a_copy_follows_the_store_and_says_when_it_caught_up_with_an_erasure(cdp, tmp_path):
    """The running server's copy is taken while the view moves on, then follows the store up to
    where the read side's view is (Service._follow). An erasure it catches up with deletes the
    person's rows in the copy, so the copy's file holds their bytes and must be rewritten again:
    _follow says so."""
    from cdp.application import CustomerApplication
    from cdp.config import Settings
    from cdp.viewwriter import make_projector
    from cdp.server.readside import ReadSide
    from cdp.server.service import Service
    from tests.events import jsonl
    from tests.test_privacy import ANN, ingest, people_events

    cfg = Settings.from_env({"CDP_HOME": str(cdp.home)})

    def follow(copy, erased: bool) -> None:
        """The copy follows the home's view (the read side's) as it is now."""
        with CustomerApplication(cfg) as app:
            read = ReadSide(cfg, app)
            follower = make_projector(cfg, copy)
            try:
                assert Service._follow(read, follower, ()) is erased
                assert follower.position == read.position == app.max_position()
                ann = "SELECT count(*) FROM customer_sources WHERE business_unit = 'retail' AND source_id = 'R-1'"
                assert follower.con.execute(ann).fetchall()[0][0] == (0 if erased else 1)
            finally:
                follower.close()
                read.projector.close()  # its threads were never started: nothing else to stop

    ingest(cdp, tmp_path, "people.jsonl", jsonl(people_events()))
    first = tmp_path / "first.duckdb"
    shutil.copy(cdp.home / "view.duckdb", first)  # a copy taken before more purchases arrived
    again = [{**e, "id": e["id"] + "-again"} for e in people_events() if e["id"].startswith("p")]
    ingest(cdp, tmp_path, "again.jsonl", jsonl(again))
    second = tmp_path / "second.duckdb"
    shutil.copy(cdp.home / "view.duckdb", second)  # one taken before the erasure
    follow(first, erased=False)  # the purchases alone
    cdp("erase", ANN["email"], "--yes")
    follow(second, erased=True)
