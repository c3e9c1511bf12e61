"""The embedded dead-letter file (ingest/deadletter.py): a writer that keeps going while an erasure
rewrites the file loses none of its entries, and none of those the rewrite kept."""
from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

from ingest.deadletter import DeadLetterFile, remove_entries
from ingest.records import Rejected


def rejected(event_id: str) -> Rejected:
    return Rejected(reason="schema", origin="test", kind="schema", raw=f'{{"id": "{event_id}"}}', event_id=event_id)


def event_ids(path: Path) -> list[str]:
    return [json.loads(line)["event_id"] for line in path.read_text().splitlines()]


def test_entries_written_after_a_rewrite_land_in_the_new_file(tmp_path):
    path = tmp_path / "deadletter.jsonl"
    writer = DeadLetterFile(path)
    for event_id in ("keep-1", "drop-1"):
        writer.write(rejected(event_id))
    writer.flush()
    assert remove_entries(path, lambda line: b"drop" in line) == 1
    writer.write(rejected("keep-2"))
    writer.close()
    assert event_ids(path) == ["keep-1", "keep-2"]


def _write_many(path: Path, count: int) -> None:
    with DeadLetterFile(path) as writer:
        for n in range(count):
            writer.write(rejected(f"w-{n}"))
            writer.flush()  # a batch each, as the pipeline flushes


def third(line: bytes) -> bool:
    return int(json.loads(line)["event_id"][2:]) % 3 == 0


def test_a_rewrite_beside_a_writing_process_loses_nothing(tmp_path):
    """Another process (the server's resolver) appends batch after batch while this one removes
    entries again and again: every entry the rewrites did not remove is in the file at the end."""
    path = tmp_path / "deadletter.jsonl"
    count = 2000
    writer = multiprocessing.get_context("spawn").Process(target=_write_many, args=(path, count))
    writer.start()
    removed = rewrites = 0
    while writer.is_alive():
        removed += remove_entries(path, third)
        rewrites += 1
    writer.join()
    removed += remove_entries(path, third)
    assert writer.exitcode == 0 and rewrites > 1
    assert event_ids(path) == [f"w-{n}" for n in range(count) if n % 3]
    assert removed == len(range(0, count, 3))
