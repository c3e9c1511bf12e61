"""What a run of ingestion did, for the CLI's closing summary and the worker's progress line."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

SUPPRESSED = "suppressed"  # the dead-letter's kind (and reason) for an erased person's event


@dataclass
class Summary:
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    suppressed: int = 0  # events of erased people, dropped (cdp/erasure.py)
    new_customers: int = 0
    linked_sources: int = 0
    merges: int = 0
    stored_events: int = 0
    retrained: str | None = None  # self-training ran at the end of the run: what it changed
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    suppressed_events: list[tuple[str, str]] = field(default_factory=list)  # (source, id) of those dropped
    conflicts: list = field(default_factory=list)  # ingest.records.Rejected: a re-sent id with other content

    @property
    def read(self) -> int:
        return self.accepted + self.rejected + self.duplicates + self.suppressed

    def add_rejection(self, kind: str) -> None:
        self.rejected += 1
        self.reasons[kind] = self.reasons.get(kind, 0) + 1

    def add_dead_letter(self, entry: Any) -> None:
        """Counts an entry written to the dead-letter (ingest.records.Rejected): an erased person's
        input, kept as its id alone (pipeline.screened), or a rejection of its kind."""
        if entry.kind == SUPPRESSED:
            self.suppressed += 1
        else:
            self.add_rejection(entry.kind)

    def add(self, other: "Summary") -> None:
        """Adds another summary's counts (not its time) to this one."""
        for f in fields(self):
            if f.type == "int":
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        for kind, count in other.reasons.items():
            self.reasons[kind] = self.reasons.get(kind, 0) + count
