"""Console sign-in: sessions behind a signed cookie, kept (hashed) in a small SQLite file so they
survive a restart of `cdp serve`, and CSRF tokens for every form.

The cookie holds only a random session id, signed (itsdangerous, with a key file made on first
use) so a forged or altered cookie is refused before any look-up; HttpOnly, SameSite=Strict,
Secure when served over HTTPS. The file keeps the SHA-256 of the session id and of the API key it
was opened with (the same digest the key ring keys by), never either in clear: a copy of the file
opens no session and reveals no key. Every request admits the key again by that digest through
the API's gate, so a revoked key ends its sessions at once (and they are deleted), and scopes and
units are the API's. Signing out deletes the session, so a copied cookie is worthless afterwards.

CSRF: each session's token is an HMAC of its id (nothing more to store); the sign-in form, before
there is a session, carries a nonce matched against a signed cookie of its own.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from cdp.keyfiles import read_or_create
from cdp.keys import Key

SESSION_COOKIE = "cdp_session"
LOGIN_COOKIE = "cdp_login"
LOGIN_SECONDS = 3600
SCHEMA = """CREATE TABLE IF NOT EXISTS console_sessions (
    id_digest TEXT PRIMARY KEY, key_digest TEXT NOT NULL, started REAL NOT NULL, flash TEXT)"""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Session:
    id_digest: str
    key_digest: str  # the key ring's digest of the API key signed in with
    started: float
    csrf: str
    flash: str | None = None  # one message for the next page (the result of a split or a verdict)
    key: Key | None = None    # the key as admitted for this request (pages.signed_in)


class Sessions:
    def __init__(self, path: Path, key_file: Path, lifetime_seconds: float):
        self.lifetime = lifetime_seconds
        self.secret = read_or_create(key_file, lambda key: key.hex()).encode()
        self.signer = URLSafeTimedSerializer(self.secret, salt="cdp-console")
        self.login_signer = URLSafeTimedSerializer(self.secret, salt="cdp-console-login")
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # owner-only before sqlite opens it
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()
        self._sql("DELETE FROM console_sessions WHERE started < ?", time.time() - self.lifetime)

    def _sql(self, sql: str, *params: object) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- sessions ----------------------------------------------------------------------------

    def start(self, response: Response, request: Request, key_digest: str) -> None:
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        self._sql("DELETE FROM console_sessions WHERE started < ?", now - self.lifetime)
        self._sql("INSERT INTO console_sessions VALUES (?, ?, ?, NULL)", _sha256(session_id), key_digest, now)
        self._set(response, request, SESSION_COOKIE, self.signer.dumps(session_id), int(self.lifetime))
        response.delete_cookie(LOGIN_COOKIE, path="/login")

    def of(self, request: Request) -> Session | None:
        """The request's live session, or None (no cookie, a bad signature, expired, signed out)."""
        session_id = self._unsign(request.cookies.get(SESSION_COOKIE), self.lifetime)
        if session_id is None:
            return None
        id_digest = _sha256(session_id)
        rows = self._sql("SELECT key_digest, started, flash FROM console_sessions WHERE id_digest = ?", id_digest)
        if not rows or time.time() - rows[0][1] > self.lifetime:
            return None
        key_digest, started, flash = rows[0]
        return Session(id_digest, key_digest, started, self._csrf_of(session_id), flash)

    def end(self, request: Request, response: Response) -> None:
        session_id = self._unsign(request.cookies.get(SESSION_COOKIE), self.lifetime)
        if session_id is not None:
            self._sql("DELETE FROM console_sessions WHERE id_digest = ?", _sha256(session_id))
        response.delete_cookie(SESSION_COOKIE, path="/")

    def end_for_key(self, key_digest: str) -> None:
        """Every session opened with this key (revoked)."""
        self._sql("DELETE FROM console_sessions WHERE key_digest = ?", key_digest)

    def flash(self, session: Session, message: str) -> None:
        self._sql("UPDATE console_sessions SET flash = ? WHERE id_digest = ?", message, session.id_digest)

    def take_flash(self, session: Session) -> str | None:
        if session.flash is not None:
            self._sql("UPDATE console_sessions SET flash = NULL WHERE id_digest = ?", session.id_digest)
        message, session.flash = session.flash, None
        return message

    # -- CSRF ----------------------------------------------------------------------------------

    def _csrf_of(self, session_id: str) -> str:
        return hmac.new(self.secret, b"csrf:" + session_id.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def csrf_ok(session: Session, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(32)

    def set_login_nonce(self, request: Request, response: Response, nonce: str) -> None:
        """The sign-in form's nonce, also set (signed) in a cookie the form's post must bring."""
        self._set(response, request, LOGIN_COOKIE, self.login_signer.dumps(nonce), LOGIN_SECONDS, path="/login")

    def login_nonce_ok(self, request: Request, sent: str | None) -> bool:
        expected = self._unsign(request.cookies.get(LOGIN_COOKIE), LOGIN_SECONDS, self.login_signer)
        return bool(expected and sent) and hmac.compare_digest(expected.encode(), str(sent).encode())

    # -- cookies -------------------------------------------------------------------------------

    def _unsign(self, value: str | None, max_age: float,
                signer: URLSafeTimedSerializer | None = None) -> str | None:
        if not value:
            return None
        try:
            return str((signer or self.signer).loads(value, max_age=int(max_age)))
        except BadSignature:  # also SignatureExpired
            return None

    @staticmethod
    def _set(response: Response, request: Request, name: str, value: str, max_age: int, path: str = "/") -> None:
        response.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
