"""Every command of the application (cdp/application.py) under two writers on one PostgreSQL store:
the commands take the writers' lock, take in what the other writer committed, and commit, so no
update is lost and no model version is taken twice.

The concurrent writer ingests in small batches from a thread of this process, through the same
command the worker calls; the other writer is `cdp identity split|train` as subprocesses, the
way people run them, or a second application in this process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.events import event, write

pytestmark = [pytest.mark.postgres, pytest.mark.slow]
psycopg = pytest.importorskip("psycopg")

CDP = [sys.executable, "-m", "cdp"]
ANN = {"email": "ann@example.org", "first_name": "Ann", "last_name": "Lee"}


def environment(home: Path, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDP_")}
    env.update(CDP_HOME=str(home), CDP_EVENT_STORE=dsn, CDP_AS_OF="2025-06-30")
    return env


def cdp(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*CDP, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def settings(home: Path, dsn: str):
    from cdp.config import Settings

    return Settings.from_env({"CDP_HOME": str(home), "CDP_EVENT_STORE": dsn, "CDP_AS_OF": "2025-06-30"})


def rows(dsn: str, sql: str, params=()) -> list[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


class Writer(threading.Thread):
    """The other writer: ingests `path` in batches of `size` with a pause between them, as a worker
    does; the last batch waits for `release`, so it surely comes after the other writer's commands."""

    def __init__(self, home: Path, dsn: str, path: Path, size: int = 25, pause: float = 0.05):
        super().__init__(daemon=True)
        self.cfg, self.path, self.size, self.pause = settings(home, dsn), path, size, pause
        self.error: BaseException | None = None
        self.batches = 0
        self.release = threading.Event()

    def run(self) -> None:
        from cdp.pipeline import Pipeline, batched
        from cdp.summary import Summary

        try:
            with Pipeline(self.cfg, project=False) as pipeline:
                chunks = list(batched(pipeline.ingestor.read([str(self.path)]), self.size))
                for i, chunk in enumerate(chunks):
                    if i == len(chunks) - 1:
                        self.release.wait(300)
                    pipeline.process_batch(chunk, Summary())
                    self.batches += 1
                    if not self.release.is_set():
                        time.sleep(self.pause)
        except BaseException as error:
            self.error = error


def stream(tmp_path: Path, people: int = 300, events: int = 2400) -> tuple[Path, int]:
    """Events of many people, with Ann's two records (retail:R1, bank:B1) coming back now and then."""
    lines = []
    for i in range(events):
        if i % 100 == 0:
            lines.append(event(f"r{i}", "retail", "R1", "cdp.purchase", customer=ANN, amount=1.0))
            lines.append(event(f"b{i}", "bank", "B1", "cdp.purchase", customer=ANN, amount=1.0))
        p = i % people
        lines.append(event(f"x{i}", "telecom", f"T{p}", customer={"email": f"p{p}@example.org",
                                                                  "first_name": f"Name{p}"}))
    lines.append(event("r-last", "retail", "R1", "cdp.purchase", customer=ANN, amount=1.0))
    lines.append(event("b-last", "bank", "B1", "cdp.purchase", customer=ANN, amount=1.0))
    return write(tmp_path / "stream.jsonl", lines), len(lines)


def test_split_and_train_while_another_writer_ingests(fresh_postgres_dsn: str, tmp_path: Path, demo_files):
    from identity.resolver import new_customer_id

    dsn = fresh_postgres_dsn
    first = write(tmp_path / "first.jsonl", [event("e1", "retail", "R1", customer=ANN),
                                             event("e2", "bank", "B1", customer=ANN)])
    # one unit of the demo: records with near-duplicates, for the model to learn from
    cdp(environment(tmp_path / "setup", dsn), "ingest", str(first), str(demo_files.event_files[0]))
    ann = new_customer_id("retail", "R1")
    before = rows(dsn, "SELECT count(*) FROM cdp_event_keys")[0][0]
    path, total = stream(tmp_path)
    writer = Writer(tmp_path / "writer", dsn, path)
    writer.start()
    deadline = time.monotonic() + 120
    while writer.batches < 5 and writer.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    commands = [subprocess.Popen([*CDP, *args], env=environment(tmp_path / home, dsn), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for home, args in (("split", ["identity", "split", ann, "--source", "bank:B1"]),
                                   ("train1", ["identity", "train", "--seed", "1"]),
                                   ("train2", ["identity", "train", "--seed", "2"]))]
    started = writer.batches
    outputs = [c.communicate(timeout=300) for c in commands]
    during = writer.batches - started
    writer.release.set()
    assert [c.returncode for c in commands] == [0, 0, 0], [err for _, err in outputs]
    writer.join(300)
    assert writer.error is None, repr(writer.error)
    assert during > 0, "the other writer committed nothing while the commands ran: nothing was tested"

    # every event once
    assert rows(dsn, "SELECT count(*) FROM cdp_event_keys")[0][0] == before + total
    # two trainings, two versions
    assert sorted(r[0] for r in rows(dsn, "SELECT version FROM identity_model")) == [1, 2]
    # the split held for the writer that did not make it: B1's later events went to its new
    # customer, not back to Ann's, and the e-mail they share did not merge them again
    split_off = outputs[0][0].split("new customer ")[1].split()[0]
    view = tmp_path / "rebuilt"
    cdp(environment(view, dsn), "projections", "rebuild")
    owners = cdp(environment(view, dsn), "query", "SELECT business_unit || ':' || source_id AS record, "
                 "string_agg(DISTINCT customer_id, ' ') AS owners FROM customer_events "
                 "WHERE source_id IN ('R1', 'B1') GROUP BY 1", "--format", "csv").stdout.splitlines()[1:]
    owners = dict(line.split(",", 1) for line in owners)
    assert owners == {"retail:R1": ann, "bank:B1": split_off}
    merges = rows(dsn, "SELECT count(*) FROM identity_redirects WHERE absorbed_id = %s", (split_off,))[0][0]
    assert merges == 0


def test_confirm_and_reject_by_one_writer_are_seen_by_the_other(fresh_postgres_dsn: str, tmp_path: Path):
    """Two applications on one store, each with its own copies: a verdict one of them records is
    honoured by the other's next batch, with no reload in between."""
    from cdp.pipeline import Pipeline
    from cdp.summary import Summary
    from identity.resolver import new_customer_id

    dsn = fresh_postgres_dsn
    people = write(tmp_path / "people.jsonl", [
        event("1", "retail", "R5", customer={"email": "kim@example.org", "first_name": "Kim"}),
        event("2", "bank", "B5", customer={"email": "kim.work@example.org", "first_name": "Kim"}),
        event("3", "retail", "R6", customer={"email": "lou@example.org", "first_name": "Lou"}),
    ])
    later = write(tmp_path / "later.jsonl", [
        event("4", "bank", "B5", "cdp.purchase", customer={"email": "kim.work@example.org"}, amount=2.0),
        event("5", "bank", "B6", customer={"email": "lou@example.org", "first_name": "Lou"}),
    ])
    with Pipeline(settings(tmp_path / "a", dsn), project=False) as a, \
            Pipeline(settings(tmp_path / "b", dsn), project=False) as b:
        a.process_batch(list(a.ingestor.read([str(people)])), Summary())
        assert b.app.confirm_match("retail:R5", "bank:B5") == new_customer_id("retail", "R5")
        summary = Summary()
        a.process_batch(list(a.ingestor.read([str(later)])), summary)
        assert summary.accepted == 2
        assert a.app.survivor(new_customer_id("bank", "B5")) == new_customer_id("retail", "R5")
        # B6 shares Lou's e-mail: linked to R6's customer; b rejects that pair, a then sees it
        lou = new_customer_id("retail", "R6")
        assert a.app.survivor(new_customer_id("retail", "R6")) == lou
        with pytest.raises(ValueError, match="already one customer"):
            b.app.reject_match("retail:R6", "bank:B6")
        assert b.app.split(lou, ["bank:B6"], "not Lou")[0].customer_id == lou
        assert a.app.reject_match("retail:R6", "bank:B6") == lou  # a knows B6 is apart now
    recorded = rows(dsn, "SELECT topic, count(*) FROM cdp_events WHERE topic LIKE %s GROUP BY 1 ORDER BY 1",
                    ("%Match%",))
    assert recorded == [("cdp.domain:Customer.MatchConfirmed", 1), ("cdp.domain:Customer.MatchRejected", 1)]
    versions = rows(dsn, "SELECT originator_id, array_agg(originator_version ORDER BY originator_version) "
                         "FROM cdp_events GROUP BY 1")
    assert all(v == list(range(1, len(v) + 1)) for _, v in versions), "heads taken from the other writer"


def test_autovacuum_of_the_events_table_is_not_throttled_and_analyzes_lightly(fresh_postgres_dsn: str,
                                                                              tmp_path: Path):
    """Every insert takes the events table's EXCLUSIVE lock, which an autovacuum or an automatic
    ANALYZE of the table holds off; a throttled vacuum was cancelled only after PostgreSQL's
    deadlock_timeout (1 s), once a minute while events stream in, and an ANALYZE sampling 30,000
    rows held inserts 0.4 s (store.EventStore._unthrottle_vacuum, _light_analyze). The store sets
    the table's option and its columns' statistics targets when it opens it, keeps the library's
    own options, and leaves them set once."""
    env = environment(tmp_path / "home", fresh_postgres_dsn)
    options = "SELECT reloptions FROM pg_class WHERE relname = 'cdp_events'"
    targets = ("SELECT a.attname, a.attstattarget FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
               "WHERE c.relname = 'cdp_events' AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum")
    for n in range(2):  # opened twice: the second open finds it set
        cdp(env, "ingest", str(write(tmp_path / f"e{n}.jsonl", [event(f"v{n}", "retail", f"R{n}", customer=ANN)])))
        (found,) = rows(fresh_postgres_dsn, options)[0]
        assert "autovacuum_vacuum_cost_delay=0" in found
        assert any(option.startswith("autovacuum_vacuum_threshold=") for option in found)  # the library's
        columns = rows(fresh_postgres_dsn, targets)
        assert {"originator_id", "state", "notification_id"} <= {name for name, _ in columns}
        assert all(target == 10 for _, target in columns), columns
    assert rows(fresh_postgres_dsn, "SELECT count(*) FROM cdp_events")[0][0] >= 2


def test_an_erasure_reads_no_event_key_and_the_next_batch_still_knows_every_one(fresh_postgres_dsn: str,
                                                                                  tmp_path: Path):
    """An erasure needs neither the store's event keys nor its heads, and reading them all cost it
    2.3 s on a million events; the same writer's next batch then reads them, and knows every key
    and head, its own erasure's and the other writer's."""
    from cdp.pipeline import Pipeline
    from cdp.summary import Summary
    from identity.resolver import new_customer_id

    dsn = fresh_postgres_dsn
    people = write(tmp_path / "people.jsonl", [
        event("1", "retail", "R5", customer={"email": "kim@example.org", "first_name": "Kim"}),
        event("2", "retail", "R6", customer={"email": "lou@example.org", "first_name": "Lou"}),
        event("3", "bank", "B7", customer={"email": "max@example.org", "first_name": "Max"}),
    ])
    later = write(tmp_path / "later.jsonl", [
        event("4", "retail", "R6", "cdp.purchase", customer={"email": "lou@example.org"}, amount=3.0),
    ])
    more = write(tmp_path / "more.jsonl", [
        event("5", "retail", "R5", "cdp.purchase", customer={"email": "kim@example.org"}, amount=4.0),
        event("6", "retail", "R6", "cdp.purchase", customer={"email": "lou@example.org"}, amount=5.0),
    ])
    with Pipeline(settings(tmp_path / "a", dsn), project=False) as a, \
            Pipeline(settings(tmp_path / "b", dsn), project=False) as b:
        a.process_batch(list(a.ingestor.read([str(people)])), Summary())
        b.app.erase(new_customer_id("retail", "R5"))
        assert len(b.app.store.seen) == 0
        a.process_batch(list(a.ingestor.read([str(later)])), Summary())
        summary = Summary()
        b.process_batch(list(b.ingestor.read([str(people), str(later), str(more)])), summary)
        assert (summary.duplicates, summary.suppressed, summary.accepted) == (4, 1, 1)
    versions = rows(dsn, "SELECT originator_id, array_agg(originator_version ORDER BY originator_version) "
                         "FROM cdp_events GROUP BY 1")
    assert all(v == list(range(1, len(v) + 1)) for _, v in versions), "a head missed"
    lou = new_customer_id("retail", "R6").replace("-", "")
    assert max(len(v) for k, v in versions if str(k).replace("-", "") == lou) >= 3


def test_commands_start_and_write_while_a_dump_holds_every_table(fresh_postgres_dsn: str, tmp_path: Path):
    """pg_dump holds every table it dumps (ACCESS SHARE) for its whole run, as an open transaction
    in psql does: a command starting meanwhile used to queue its tracking DDL behind it and wait,
    holding back every later reader of those tables."""
    env = environment(tmp_path / "home", fresh_postgres_dsn)
    cdp(env, "ingest", str(write(tmp_path / "people.jsonl", [
        event("1", "retail", "R5", customer={"email": "kim@example.org", "first_name": "Kim"})])))
    more = write(tmp_path / "more.jsonl", [
        event("2", "retail", "R5", "cdp.purchase", customer={"email": "kim@example.org"}, amount=2.0),
        event("3", "bank", "B6", customer={"email": "lou@example.org", "first_name": "Lou"})])
    with psycopg.connect(fresh_postgres_dsn) as dump:
        tables = dump.execute("SELECT string_agg(quote_ident(tablename), ', ') FROM pg_tables "
                              "WHERE schemaname = current_schema()").fetchone()[0]
        dump.execute(f"LOCK TABLE {tables} IN ACCESS SHARE MODE")
        started = time.perf_counter()
        done = subprocess.run([*CDP, "ingest", str(more)], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        shown = subprocess.run([*CDP, "customer", "show", "lou@example.org"], env=env, capture_output=True, text=True,
                               timeout=120)
        assert shown.returncode == 0 and "Lou" in shown.stdout, shown.stderr
        assert time.perf_counter() - started < 60
