"""Parsing in a helper process gives exactly what parsing in-process gives, in the same order."""
import io
from functools import partial

from cdp.config import Settings
from cdp.pipeline import make_ingestor
from ingest.parallel import ParseWorkers
from tests.events import event, jsonl


def test_parse_workers_match_in_process_parsing_record_for_record(tmp_path):
    settings = Settings.from_env({"CDP_HOME": str(tmp_path), "CDP_MAX_EVENT_BYTES": "3000"})
    lines = []
    for i in range(5000):
        lines.append(event(f"e{i}", "retail", f"R{i % 700}", "cdp.purchase",
                           customer={"email": f"P{i % 700}@Example.org", "phone": "07911 123123"}, amount=i))
        if i % 997 == 0:
            lines += ["{not json", b"\xff\xfe", event(f"x{i}", "retail", "R1", customer={"first_name": "y" * 4000})]
    data = jsonl(lines)
    inline = list(make_ingestor(settings).read_jsonl(io.BytesIO(data), "f.jsonl"))
    workers = ParseWorkers(partial(make_ingestor, settings), 1)
    counted = []
    try:
        parallel = list(workers.records(io.BytesIO(data), "f.jsonl", settings.max_event_bytes, counted.append))
    finally:
        workers.close()
    assert parallel == inline
    assert sum(counted) == len(data)
    assert sum(1 for r in parallel if type(r).__name__ == "Rejected") == 3 * 6
