"""The unified view as a whole: rebuild equals the incremental view, the Parquet export and its
data dictionary, and the HTML report opened in a real headless Chromium."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from projections.dictionary import TABLES

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def snapshot(home: Path) -> dict[str, list[tuple]]:
    con = duckdb.connect(str(home / "view.duckdb"), read_only=True)
    try:
        return {table: con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall() for table in TABLES}
    finally:
        con.close()


def test_rebuild_equals_incremental_view(demo_view, cdp_at, tmp_path):
    home = tmp_path / "copy"
    shutil.copytree(demo_view.home, home)
    incremental = snapshot(home)
    assert len(incremental["customers"]) > 300 and len(incremental["business_unit_overlap"]) == 9
    assert incremental["metric_state"][0][0].isoformat() == "2026-11-01"
    cdp_at(home)("projections", "rebuild")
    rebuilt = snapshot(home)
    for table in TABLES:
        assert rebuilt[table] == incremental[table], table


def test_export_writes_parquet_for_every_table_with_a_dictionary(demo_view, tmp_path):
    out = tmp_path / "export"
    demo_view("export", str(out))
    view = snapshot(demo_view.home)
    for table in TABLES:
        parquet = pq.read_table(out / f"{table}.parquet")
        assert parquet.num_rows == len(view[table]), table
    dictionary = (out / "data_dictionary.md").read_text()
    tables = json.loads((out / "data_dictionary.json").read_text())["tables"]
    assert {t["table"] for t in tables} == set(TABLES)
    for table in tables:
        assert pq.read_schema(out / table["file"]).names == [c["name"] for c in table["columns"]]
        undocumented = [c["name"] for c in table["columns"] if not c["description"]]
        assert not undocumented, f"{table['table']}: {undocumented}"
    assert "| `predicted_value_12m` | DOUBLE |" in dictionary


def test_export_into_a_folder_whose_name_has_quotes(demo_view, tmp_path):
    out = tmp_path / "bob's export; DROP TABLE customers"
    demo_view("export", str(out))
    assert pq.read_table(out / "customers.parquet").num_rows == len(snapshot(demo_view.home)["customers"])


def _chromium() -> str:
    found = shutil.which("chromium") or (os.path.exists("/usr/bin/chromium") and "/usr/bin/chromium")
    if found:
        return found
    message = "chromium not installed: scripts/test.sh installs it (apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def test_report_shows_its_charts_in_headless_chromium(demo_view, tmp_path):
    chromium = _chromium()
    out = tmp_path / "report"
    demo_view("report", str(out))
    page = out / "report.html"
    assert "<script" not in page.read_text() and "http" not in re.sub(r'xmlns="[^"]+"', "", page.read_text())
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                              page.as_uri()], capture_output=True, text=True, timeout=120).stdout
        screenshot = tmp_path / "report.png"
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,2400",
                        f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=120)
    charts = dict(re.findall(r'<svg class="chart" data-chart="(\w+)".*?>(.*?)</svg>', dom, re.S))
    assert set(charts) == {"segments", "lifecycle", "overlap", "cohorts", "tiers"}
    assert charts["lifecycle"].count('class="bar"') == 5      # prospect, new, active, at_risk, churned
    assert charts["overlap"].count('class="cell"') == 9       # 3 x 3 units
    assert charts["segments"].count('class="bar"') >= 5
    assert charts["cohorts"].count('class="cell"') >= 12
    assert screenshot.stat().st_size > 20_000                 # a rendered page, not a blank one
