"""The CLI's way to the view while `cdp serve` owns it: `CDP_HOME/server.json` names the server
and a local key (cdp/server/service.py); `RemoteView` answers the few connection calls the CLI's
readers make (`execute(sql, params).fetchall()`, `.description`, `sql(q).to_arrow_reader(n)`) by
sending each query to `POST /v1/query?format=arrow`; the export's `COPY table TO 'file.parquet'`
fetches the table and writes the file on the client's side (the server touches no files)."""
from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from typing import Any

import orjson
import pyarrow as pa

from cdp.config import Settings
from cdp.health import say
from cdp.server.viewgate import REWRITING

TIMEOUT = 3600.0
REWRITE_WAIT_SECONDS = 300.0  # how long a command beside the server waits out a rewrite of the view's file
_COPY_TO_PARQUET = re.compile(r"^COPY (\w+) TO '((?:[^']|'')*)' \(FORMAT parquet\b", re.I)


class ServerError(ValueError):
    """The server refused or failed a query; the message is the server's."""


def running_server(cfg: Settings) -> tuple[str, str] | None:
    """(url, key) of the server that owns this CDP_HOME's view, when one is alive."""
    try:
        info = orjson.loads(cfg.server_file.read_bytes())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        with urllib.request.urlopen(info["url"] + "/health", timeout=2.0):
            pass
    except urllib.error.HTTPError:
        pass  # answering (even "degraded") is alive
    except (OSError, ValueError):
        return None
    return info["url"], info["key"]


def _send(url: str, request: urllib.request.Request, timeout: float = TIMEOUT) -> bytes:
    """The answer's body, or ServerError with the server's own message. While the server rewrites
    the view's file after an erasure it refuses people's decisions (503 `view_rewriting`, with
    Retry-After): the command says so once, waits and asks again, up to REWRITE_WAIT_SECONDS (a
    script that erases people one by one meets the rewrite an earlier erasure scheduled)."""
    deadline, said = time.monotonic() + REWRITE_WAIT_SECONDS, False
    while True:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as failure:
            try:
                answer = orjson.loads(failure.read())
            except ValueError:
                answer = None
            answer = answer if isinstance(answer, dict) else {}
            wait = _retry_after(failure)
            if failure.code == 503 and answer.get("code") == REWRITING and time.monotonic() + wait < deadline:
                if not said:
                    say(f"cdp: the server is rewriting the view's file after an erasure; waiting for it "
                        f"(up to {REWRITE_WAIT_SECONDS:.0f} s)")
                    said = True
                time.sleep(wait)
                continue
            raise ServerError(f"{answer.get('message') or failure.reason} (server {url})") from None


def _retry_after(failure: urllib.error.HTTPError) -> float:
    try:
        return min(max(float(failure.headers.get("Retry-After", 1)), 0.1), 30.0)
    except ValueError:
        return 1.0


def call(server: tuple[str, str], method: str, path: str, body: Any = None, actor: str | None = None,
         timeout: float = TIMEOUT) -> Any:
    """One JSON request to the running server with its local key (`cdp erase`, `cdp audit`, the
    audience commands beside `cdp serve`); the JSON answer, or ServerError with the server's
    message. `actor` names the CLI's user for the audit trail (only the local key may)."""
    url, key = server
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if actor:
        headers["X-Cdp-Actor"] = actor
    data = None if body is None else orjson.dumps(body)
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    return orjson.loads(_send(url, request, timeout) or b"null")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


class RemoteView:
    def __init__(self, url: str, key: str):
        self.url, self.key = url, key
        self.table: pa.Table | None = None

    def _post(self, sql: str, params: Any) -> pa.Table:
        body = {"sql": sql}
        if params:
            body["params"] = {k: _plain(v) for k, v in params.items()} if isinstance(params, dict) else _plain(params)
        request = urllib.request.Request(self.url + "/v1/query?format=arrow", data=orjson.dumps(body), method="POST",
                                         headers={"Authorization": f"Bearer {self.key}",
                                                  "Content-Type": "application/json"})
        return pa.ipc.open_stream(_send(self.url, request)).read_all()

    def execute(self, sql: str, params: Any = None) -> "RemoteView":
        copy = _COPY_TO_PARQUET.match(sql)
        if copy is not None:  # the export's `COPY t TO 'file'`: the file is written here, by the client
            import pyarrow.parquet as pq

            table = self._post(f"SELECT * FROM {copy.group(1)}", None)
            pq.write_table(table, copy.group(2).replace("''", "'"), compression="zstd")
            self.table = pa.table({"Count": [table.num_rows]})
            return self
        self.table = self._post(sql, params)
        return self

    def sql(self, sql: str) -> "RemoteView":
        return self.execute(sql)

    @property
    def description(self) -> list[tuple] | None:
        return None if self.table is None else [(name, None) for name in self.table.column_names]

    def fetchall(self) -> list[tuple]:
        columns = [column.to_pylist() for column in self.table.columns]
        return list(zip(*columns)) if columns else []

    def to_arrow_reader(self, batch_rows: int = 100_000) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.table.schema, self.table.to_batches(batch_rows))

    def close(self) -> None:
        self.table = None
