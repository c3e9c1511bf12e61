"""One side of `python -m bench.visible --mode batches`: projects batches onto its own copy of a view
with the `projections` package of whichever code tree PYTHONPATH names first (this tree's, or the
tree given by `--against`), so that two versions of the projector run interleaved in one run.

Run as a script: `python bench/projector_worker.py VIEW ROWS DUMP`; reads batch bounds `start end`
from stdin, one per line, applies rows[start:end] (ROWS: a pickle of the store's notifications),
answers `cpu wall baseline_cpu baseline_wall` in seconds; on an empty line it writes each table of
the view to DUMP-<table>.parquet and exits. Not imported by anything else.
"""
from __future__ import annotations

import pickle
import sys
import time


def main(view: str, rows_file: str, dump: str) -> None:
    import pyarrow as pa

    from cdp.server.readside import LOOKUP_INDEXES
    from projections.projector import Projector
    from projections.transactions import transaction

    with open(rows_file, "rb") as file:
        rows = pickle.load(file)
    projector = Projector(view, memory_limit="2GB")  # the server's CDP_SERVE_MEMORY default
    con = projector.con
    for statement in LOOKUP_INDEXES:
        con.execute(statement)
    con.execute("CREATE TEMP TABLE baseline (position BIGINT, customer_id VARCHAR, topic VARCHAR, state BLOB)")

    def baseline(batch: list[tuple]) -> None:
        """DuckDB inserting the same notifications into a table and committing, on the same connection."""
        positions, ids, topics, states = zip(*batch)
        con.register("notifications", pa.table({
            "position": pa.array(positions, pa.int64()), "customer_id": pa.array(ids, pa.string()),
            "topic": pa.array(topics, pa.string()), "state": pa.array(states, pa.binary())}))
        with transaction(con):
            con.execute("INSERT INTO baseline SELECT * FROM notifications")
        con.unregister("notifications")

    def timed(work) -> tuple[float, float]:
        wall, used = time.perf_counter(), time.process_time()
        work()
        return time.process_time() - used, time.perf_counter() - wall

    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        start, end = map(int, line.split())
        batch = rows[start:end]
        applied = timed(lambda: projector.apply(batch))
        raw = timed(lambda: baseline(batch))
        print(*applied, *raw, flush=True)
    for table in ("customers", "customer_business_units", "customer_events", "customer_sources",
                  "customer_redirects", "projection_state"):
        con.execute(f"COPY (SELECT * FROM {table}) TO '{dump}-{table}.parquet'")
    projector.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
