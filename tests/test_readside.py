"""The read side of `cdp serve` in process: which day its scores are as of, how many threads its view runs."""
from __future__ import annotations

from datetime import date

import duckdb
import pytest

from cdp.application import CustomerApplication
from cdp.config import Settings, today
from cdp.server.readside import ReadSide
from projections import metrics


@pytest.mark.parametrize("fixed", [None, "2026-01-01"])
def test_a_running_read_side_moves_its_scores_on_to_a_new_day_unless_as_of_is_set(tmp_path, fixed):
    """A server started yesterday scores as of today once the day changed (it refreshes at once,
    whatever CDP_SCORE_INTERVAL); with CDP_AS_OF it keeps that day."""
    env = {"CDP_HOME": str(tmp_path), "CDP_SCORE_INTERVAL": "3600", **({"CDP_AS_OF": fixed} if fixed else {})}
    cfg = Settings.from_env(env)
    with CustomerApplication(cfg) as app:
        read = ReadSide(cfg, app)
        try:
            started = date(2026, 1, 1)
            read.projector.as_of = started  # as if it had started on that day
            read.projector.refresh_metrics()
            read.catch_up()  # the loop's turn, with nothing new in the store
            if read._refresh is not None:
                read._refresh.join(30)
            assert metrics.state(read.projector.con)[0] == (started if fixed else today())
        finally:
            read.projector.close()  # its threads were never started: nothing else to stop


@pytest.mark.parametrize("cores, setting, threads", [(2, None, 1), (1, None, 1), (8, None, "duckdb"), (2, "0", "duckdb"),
                                                     (8, "3", 3)])
def test_the_view_runs_one_duckdb_thread_on_two_cores_unless_told(tmp_path, monkeypatch, cores, setting, threads):
    """Unset CDP_SERVE_THREADS means one DuckDB thread where the process may use two cores or fewer
    (its affinity, not the machine's count), DuckDB's own default beyond; a value set is kept (0:
    DuckDB's default)."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    env = {"CDP_HOME": str(tmp_path), **({"CDP_SERVE_THREADS": setting} if setting is not None else {})}
    cfg = Settings.from_env(env)
    with CustomerApplication(cfg) as app:
        read = ReadSide(cfg, app)
        try:
            running = read.projector.con.execute("SELECT current_setting('threads')").fetchall()[0][0]
        finally:
            read.projector.close()
    if threads == "duckdb":
        threads = duckdb.connect().execute("SELECT current_setting('threads')").fetchall()[0][0]
    assert running == threads


def test_a_checkpoint_during_another_write_of_the_views_gives_up_rather_than_fail(tmp_path):
    """After an erasure the server moves the view's log into its file; a write of the view's under
    way (a refresh of the scores on a large view takes seconds) must not turn the committed
    erasure's answer into a failure: the checkpoint says it could not, and the file's rewrite
    drops the log."""
    cfg = Settings.from_env({"CDP_HOME": str(tmp_path)})
    with CustomerApplication(cfg) as app:
        read = ReadSide(cfg, app)
        try:
            writer = read.cursor()
            writer.execute("BEGIN TRANSACTION")
            writer.execute("INSERT INTO projection_state VALUES ('a writer', 1)")
            assert read.checkpoint(attempts=3) is False
            writer.execute("COMMIT")
            assert read.checkpoint() is True
        finally:
            read.projector.close()
