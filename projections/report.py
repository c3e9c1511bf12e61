"""The HTML report for a group data team: one self-contained file, charts as inline SVG drawn here
(no JavaScript, no CDN, opens offline): segment sizes, lifecycle funnel, cross-unit overlap
heatmap, monthly cohort retention, tiers. Figures come from set-based queries on the view."""
from __future__ import annotations

from datetime import datetime, timezone
from html import escape
from pathlib import Path
from string import Template

import duckdb

TEMPLATE = Path(__file__).with_name("report.html")
LIFECYCLE = ("prospect", "new", "active", "at_risk", "churned")
SEGMENTS = ("champions", "loyal", "potential", "new", "at_risk", "hibernating", "lost", "prospect")
TIERS = ("high_value", "potential", "regular")
COHORT_MONTHS = 12   # cohorts shown (the latest, as-of month included) and months k = 0..11 after

# Customers who withdrew profiling consent have no scores (projections/metrics.py): not charted.
SCORED = "WHERE scores_withheld IS NOT TRUE"
SEGMENT_SQL = f"SELECT rfm_segment, count(*), round(sum(lifetime_value), 2) FROM customers {SCORED} GROUP BY 1"
LIFECYCLE_SQL = f"SELECT lifecycle_stage, count(*), round(sum(predicted_value_12m), 2) FROM customers {SCORED} GROUP BY 1"
TIER_SQL = f"SELECT tier, count(*), round(sum(lifetime_value), 2) FROM customers {SCORED} GROUP BY 1"
OVERLAP_SQL = "SELECT unit_x, unit_y, customers_both, share_of_x, value_both FROM business_unit_overlap"
# A cohort is the month of a customer's first purchase (customers.first_purchase_at, kept by the
# projector), so only the purchases of the last COHORT_MONTHS months' newcomers are read: about
# half the time of grouping every purchase by customer first (1.2 s → 0.6 s on 1,000,000 customers).
COHORT_SQL = f"""
WITH recent AS (
  SELECT customer_id, date_trunc('month', first_purchase_at)::DATE AS cohort FROM customers
  WHERE first_purchase_at >= date_trunc('month', $as_of::DATE) - INTERVAL {COHORT_MONTHS - 1} MONTH
    AND first_purchase_at < $as_of::DATE + 1),
active AS (
  SELECT r.cohort, date_diff('month', r.cohort, date_trunc('month', e.time)::DATE) AS k,
         count(DISTINCT e.customer_id) AS customers
  FROM customer_events e JOIN recent r USING (customer_id)
  WHERE e.type = 'cdp.purchase' AND e.time < $as_of::DATE + 1
    AND e.time >= date_trunc('month', $as_of::DATE) - INTERVAL {COHORT_MONTHS - 1} MONTH
  GROUP BY ALL)
SELECT cohort, k, customers, round(customers / max(customers) FILTER (WHERE k = 0) OVER (PARTITION BY cohort), 4)
FROM active
WHERE k < {COHORT_MONTHS}
ORDER BY cohort, k
"""
KPI_SQL = """
SELECT count(*), count(*) FILTER (WHERE orders > 0), round(sum(lifetime_value), 2),
       round(sum(predicted_value_12m), 2), count(*) FILTER (WHERE len(business_units) > 1),
       round(avg(churn_risk), 4), count(*) FILTER (WHERE nps_class = 'promoter'),
       count(*) FILTER (WHERE nps_class = 'detractor'), count(*) FILTER (WHERE nps_class IS NOT NULL)
FROM customers
"""


def _money(value: float | None) -> str:
    return f"{value or 0:,.0f}"


def bar_chart(name: str, rows: list[tuple[str, int, float]], value_label: str, centred: bool = False) -> str:
    """Horizontal bars, one per (label, count, value); `centred` draws a funnel."""
    width, bar_h, gap, left, right = 720, 26, 8, 120, 260
    top = max((count for _, count, _ in rows), default=0) or 1
    height = len(rows) * (bar_h + gap) + gap
    parts = [f'<svg class="chart" data-chart="{name}" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">']
    span = width - left - right
    for i, (label, count, value) in enumerate(rows):
        y = gap + i * (bar_h + gap)
        w = max(1.0, span * count / top) if count else 0.0
        x = left + (span - w) / 2 if centred else left
        parts.append(f'<text x="{left - 8}" y="{y + bar_h * 0.68:.0f}" text-anchor="end">{escape(label)}</text>')
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" rx="3">'
                     f'<title>{escape(label)}: {count:,}</title></rect>')
        parts.append(f'<text x="{width - right + 10}" y="{y + bar_h * 0.68:.0f}">{count:,} · '
                     f'{value_label} {_money(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def heatmap(name: str, rows: list[str], columns: list[str], cells: dict[tuple[str, str], tuple[float, str]],
            row_title: str, column_title: str) -> str:
    """A grid of cells shaded by a value in 0..1, each labelled with its text."""
    cell_w, cell_h, left, top = 64, 30, 110, 44
    width, height = left + cell_w * len(columns) + 10, top + cell_h * len(rows) + 10
    parts = [f'<svg class="chart" data-chart="{name}" role="img" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{left}" y="14" class="axis">{escape(column_title)} →</text>',
             f'<text x="4" y="{top - 24}" class="axis">{escape(row_title)} ↓</text>']
    for j, column in enumerate(columns):
        parts.append(f'<text x="{left + j * cell_w + cell_w / 2:.0f}" y="{top - 8}" text-anchor="middle">'
                     f'{escape(column)}</text>')
    for i, row in enumerate(rows):
        y = top + i * cell_h
        parts.append(f'<text x="{left - 6}" y="{y + cell_h * 0.65:.0f}" text-anchor="end">{escape(row)}</text>')
        for j, column in enumerate(columns):
            if (row, column) not in cells:
                continue
            share, text = cells[(row, column)]
            light = 95 - 55 * max(0.0, min(1.0, share))
            parts.append(f'<rect class="cell" x="{left + j * cell_w}" y="{y}" width="{cell_w - 2}" '
                         f'height="{cell_h - 2}" fill="hsl(212, 70%, {light:.0f}%)"><title>{escape(row)} / '
                         f'{escape(column)}: {escape(text)}</title></rect>')
            parts.append(f'<text x="{left + j * cell_w + cell_w / 2 - 1:.0f}" y="{y + cell_h * 0.62:.0f}" '
                         f'text-anchor="middle" class="{"dark" if light < 60 else ""}">{escape(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ordered(rows: list[tuple], order: tuple[str, ...]) -> list[tuple[str, int, float]]:
    found = {r[0]: r for r in rows}
    return [(key, found[key][1], found[key][2]) for key in order if key in found] + \
           [(str(r[0]), r[1], r[2]) for r in rows if r[0] not in order]


def charts(con: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """The report's figures as HTML fragments (KPI tiles, inline SVG charts), drawn from the view
    as it is now: the static report and the console's dashboard show the same pictures."""
    as_of = con.execute("SELECT max(as_of) FROM metric_state").fetchall()[0][0]
    customers, buyers, value, predicted, multi, churn, promoters, detractors, rated = \
        con.execute(KPI_SQL).fetchall()[0]
    overlap = con.execute(OVERLAP_SQL).fetchall()
    units = sorted({r[0] for r in overlap})
    overlap_cells = {(x, y): (share, f"{share:.0%}" if x != y else f"{both:,}") for x, y, both, share, _ in overlap}
    cohorts = con.execute(COHORT_SQL, {"as_of": as_of}).fetchall()
    cohort_rows = sorted({c.strftime("%Y-%m") for c, *_ in cohorts})
    cohort_cells = {(c.strftime("%Y-%m"), f"+{k}"): (share, f"{share:.0%}" if k else f"{n:,}")
                    for c, k, n, share in cohorts}
    nps = round(100 * (promoters - detractors) / rated) if rated else None
    kpis = [("customers", f"{customers:,}"), ("buyers", f"{buyers:,}"), ("lifetime value", _money(value)),
            ("predicted value, next 12 months", _money(predicted)), ("in 2+ business units", f"{multi:,}"),
            ("mean churn risk (buyers)", "–" if churn is None else f"{churn:.1%}"),
            ("NPS", "–" if nps is None else f"{nps:+d}")]
    fields = {
        "as_of": escape(str(as_of)),
        "generated": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "kpis": "".join(f'<div class="kpi"><div class="v">{escape(v)}</div><div class="k">{escape(k)}</div></div>'
                        for k, v in kpis),
        "segments": bar_chart("segments", _ordered(con.execute(SEGMENT_SQL).fetchall(), SEGMENTS), "value"),
        "funnel": bar_chart("lifecycle", _ordered(con.execute(LIFECYCLE_SQL).fetchall(), LIFECYCLE),
                            "predicted 12m", centred=True),
        "tiers": bar_chart("tiers", _ordered(con.execute(TIER_SQL).fetchall(), TIERS), "value"),
        "overlap": heatmap("overlap", units, units, overlap_cells, "customers of", "also customers of"),
        "cohorts": heatmap("cohorts", cohort_rows, [f"+{k}" for k in range(COHORT_MONTHS)], cohort_cells,
                           "first purchase month", "months later"),
    }
    return fields


def render(con: duckdb.DuckDBPyConnection) -> str:
    return Template(TEMPLATE.read_text(encoding="utf-8")).substitute(charts(con))


def write_report(con: duckdb.DuckDBPyConnection, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "report.html"
    path.write_text(render(con), encoding="utf-8")
    return path
