"""Schema validation of incoming events against the JSON Schema files in ``schemas/<version>/``.

The schema files are the single source of truth (see ``schemas/README.md``); this module only
compiles them with ``jsonschema_rs`` (draft 2020-12) and turns the first error into one readable
line. The files reference each other by URN ``$id`` (``urn:cdp:schema:v1:customer`` …); all of
them are put in one ``jsonschema_rs.Registry`` so references resolve offline, and any attempt to
fetch a remote schema is refused.

Fast path: ``check`` calls the compiled validator's ``is_valid`` once; errors are only collected
(and sorted by instance path, so the report is deterministic) when the event is invalid.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any

import jsonschema_rs

__all__ = ["EventValidator"]

_MAX_TEXT = 300  # longest message part we put in a dead-letter reason
_JSON_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_ATTR_NAME = re.compile(r"[a-z0-9]+")
_SCALARS = ("string", "number", "integer", "boolean")


def _refuse_remote(uri: str) -> Any:
    raise ValueError(f"schema {uri!r} is not among the local schema files (remote retrieval is disabled)")


def _short(text: str, limit: int = _MAX_TEXT) -> str:
    text = text.replace("\r", " ").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _event_label(event: dict) -> str:
    if "id" not in event:
        return "event <no id>"
    eid = event["id"]
    if isinstance(eid, str):
        return f"event {_short(repr(eid), 100)}"
    return f"event {_short(json.dumps(eid, default=repr), 100)}"


def _format_path(parts: list[str | int]) -> str:
    if not parts:
        return "(root)"
    out = []
    for p in parts:
        if isinstance(p, int):
            out.append(f"[{p}]")
        else:
            out.append(("." if out else "") + str(p))
    return "".join(out)


def _path_key(parts: list[str | int]) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in parts)


def _single_quotes(message: str) -> str:
    # jsonschema_rs quotes JSON strings with "…"; the platform's messages use Python-style '…'.
    return _JSON_STRING.sub(lambda m: "'" + m.group(1).replace('\\"', '"') + "'", message)


class EventValidator:
    """Validates CloudEvents against ``schemas/<version>/<type>.json``, one compiled validator per type."""

    def __init__(self, schemas_dir: pathlib.Path, version: str = "v1"):
        folder = pathlib.Path(schemas_dir) / version
        if not folder.is_dir():
            raise FileNotFoundError(f"no schema folder {folder}")
        self.version = version
        self._docs: dict[str, dict] = {}  # $id -> schema document
        by_file: dict[str, dict] = {}
        for path in sorted(folder.glob("*.json")):
            doc = json.loads(path.read_text(encoding="utf-8"))
            sid = doc.get("$id")
            if not isinstance(sid, str):
                raise ValueError(f"{path}: schema has no $id")
            self._docs[sid] = doc
            by_file[path.stem] = doc
        if "envelope" not in by_file:
            raise ValueError(f"{folder}: envelope.json is missing")
        registry = jsonschema_rs.Registry(list(self._docs.items()), retriever=_refuse_remote)

        def compile_(doc: dict) -> Any:
            return jsonschema_rs.Draft202012Validator(doc, registry=registry, retriever=_refuse_remote)

        self._envelope = compile_(by_file["envelope"])
        self._type_docs: dict[str, dict] = {}
        self._validators: dict[str, Any] = {}
        for stem, doc in by_file.items():
            if stem in ("envelope", "customer"):
                continue
            self._type_docs[stem] = doc
            self._validators[stem] = compile_(doc)
        self.types: frozenset[str] = frozenset(self._validators)
        self._known = ", ".join(sorted(self.types))
        self._field_types: dict[str, dict[str, str]] = {}
        self._required: dict[str, frozenset[str]] = {}

    # ------------------------------------------------------------------ validation
    def check(self, event: object) -> str | None:
        """None when valid; otherwise one line: ``event '<id>': <path>: <what> (rule: <keyword>)``."""
        if not isinstance(event, dict):
            return "event is not a JSON object"
        etype = event.get("type")
        validator = self._validators.get(etype) if isinstance(etype, str) else None
        try:
            if validator is not None:
                if validator.is_valid(event):
                    return None
            elif isinstance(etype, str):
                return (f"{_event_label(event)}: type: unknown event type {_short(repr(etype), 100)} "
                        f"(known: {self._known})")
            else:
                validator = self._envelope  # type missing or not a string: the envelope says why
            errors = list(validator.iter_errors(event))
        except (ValueError, TypeError, OverflowError) as exc:  # a value JSON cannot hold (NaN, datetime…)
            return f"{_event_label(event)}: (root): {_short(str(exc))} (rule: json)"
        if not errors:  # cannot happen for a non-string type, kept for safety
            return None
        err = min(errors, key=lambda e: (_path_key(e.instance_path), [str(p) for p in e.schema_path]))
        rule = err.kind.name
        if rule == "pattern" and list(err.instance_path) == ["time"]:
            text = f"{_short(repr(err.instance), 100)} is not an RFC 3339 date-time with offset (e.g. 2024-05-01T12:00:00Z)"
        elif rule == "propertyNames":
            bad = next((k for k in event if not _ATTR_NAME.fullmatch(str(k))), "?")
            text = (f"attribute name {_short(repr(bad), 100)} is not allowed: "
                    "extension attribute names are lowercase letters and digits")
        else:
            text = _single_quotes(err.message)
        return f"{_event_label(event)}: {_format_path(err.instance_path)}: {_short(text)} (rule: {rule})"

    # ------------------------------------------------------------------ schema introspection
    def field_types(self, event_type: str) -> dict[str, str]:
        """Dotted path -> JSON type for the scalar leaf fields of ``data`` (and ``data.customer`` …)."""
        if event_type not in self._type_docs:
            raise KeyError(f"unknown event type {event_type!r} (known: {self._known})")
        if event_type not in self._field_types:
            out: dict[str, str] = {}
            required: set[str] = set()
            data = self._data_schema(event_type)
            self._walk(data, self._type_docs[event_type], "data", out, required, True)
            self._field_types[event_type] = out
            self._required[event_type] = frozenset(required)
        return dict(self._field_types[event_type])

    def required_fields(self, event_type: str) -> frozenset[str]:
        """Dotted paths of the scalar fields the schema requires (e.g. ``data.customer.source_id``)."""
        self.field_types(event_type)
        return self._required[event_type]

    def _data_schema(self, event_type: str) -> dict:
        doc = self._type_docs[event_type]
        for part in doc.get("allOf", [doc]):
            data = part.get("properties", {}).get("data")
            if isinstance(data, dict) and "properties" in data:
                return data
        raise ValueError(f"schema of {event_type} has no data properties")

    def _resolve(self, schema: dict, doc: dict) -> tuple[dict, dict]:
        seen = 0
        while "$ref" in schema and seen < 20:
            ref = schema["$ref"]
            base, _, frag = ref.partition("#")
            target_doc = self._docs[base] if base else doc
            node: Any = target_doc
            for token in filter(None, frag.split("/")):
                node = node[token.replace("~1", "/").replace("~0", "~")]
            schema, doc, seen = node, target_doc, seen + 1
        return schema, doc

    def _walk(self, schema: dict, doc: dict, prefix: str, out: dict, required: set, req_chain: bool) -> None:
        schema, doc = self._resolve(schema, doc)
        req = set(schema.get("required", ()))
        for name, sub in schema.get("properties", {}).items():
            sub, sub_doc = self._resolve(sub, doc)
            path = f"{prefix}.{name}"
            kind = _json_type(sub)
            if kind == "object":
                self._walk(sub, sub_doc, path, out, required, req_chain and name in req)
            elif kind in _SCALARS:
                out[path] = kind
                if req_chain and name in req:
                    required.add(path)


def _json_type(schema: dict) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), None)
    if isinstance(t, str):
        return t
    values = schema.get("enum", [schema["const"]] if "const" in schema else None)
    if values:
        kinds = {("boolean" if isinstance(v, bool) else "integer" if isinstance(v, int)
                  else "number" if isinstance(v, float) else "string" if isinstance(v, str) else "other")
                 for v in values if v is not None}
        if len(kinds) == 1:
            return kinds.pop()
    return None
