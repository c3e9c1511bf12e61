"""Console sign-in: server-side sessions behind a signed cookie, and CSRF tokens for every form.

The cookie holds only a random session id, signed (itsdangerous) so a forged or altered cookie is
refused before any look-up; HttpOnly, SameSite=Strict, Secure when served over HTTPS. The API key
a person signed in with stays in this process's memory, never in the cookie or a URL, and is
checked again on every request (a revoked key ends its sessions at once; scopes and units are
the API's, through the same gate). Signing out deletes the session here, so a copied cookie is
worthless afterwards. The signing secret is made at start-up: a restart signs everyone out.

CSRF: each session has a token every form carries in a hidden field `csrf`; the sign-in form,
before there is a session, carries a nonce matched against a signed cookie of its own.
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

from cdp.keys import Key

SESSION_COOKIE = "cdp_session"
LOGIN_COOKIE = "cdp_login"
LOGIN_SECONDS = 3600


@dataclass
class Session:
    token: str
    key: Key
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    started: float = field(default_factory=time.time)
    flash: str | None = None  # one message for the next page (the result of a split or a verdict)

    def take_flash(self) -> str | None:
        message, self.flash = self.flash, None
        return message


class Sessions:
    def __init__(self, lifetime_seconds: float):
        self.lifetime = lifetime_seconds
        self.signer = URLSafeTimedSerializer(secrets.token_bytes(32), salt="cdp-console")
        self._open: dict[str, Session] = {}
        self._lock = threading.Lock()

    # -- sessions ----------------------------------------------------------------------------

    def start(self, response: Response, request: Request, token: str, key: Key) -> Session:
        session_id = secrets.token_urlsafe(32)
        session = Session(token, key)
        with self._lock:
            now = time.time()
            for stale in [i for i, s in self._open.items() if now - s.started > self.lifetime]:
                del self._open[stale]
            self._open[session_id] = session
        self._set(response, request, SESSION_COOKIE, self.signer.dumps(session_id), int(self.lifetime))
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return session

    def of(self, request: Request) -> Session | None:
        """The request's live session, or None (no cookie, a bad signature, expired, signed out)."""
        session_id = self._unsign(request.cookies.get(SESSION_COOKIE), self.lifetime)
        with self._lock:
            session = self._open.get(session_id) if session_id else None
            if session is not None and time.time() - session.started > self.lifetime:
                del self._open[session_id]
                return None
        return session

    def end(self, request: Request, response: Response) -> None:
        session_id = self._unsign(request.cookies.get(SESSION_COOKIE), self.lifetime)
        with self._lock:
            self._open.pop(session_id or "", None)
        response.delete_cookie(SESSION_COOKIE, path="/")

    def end_for_key(self, key_id: str) -> None:
        with self._lock:
            for session_id in [i for i, s in self._open.items() if s.key.key_id == key_id]:
                del self._open[session_id]

    # -- CSRF ----------------------------------------------------------------------------------

    @staticmethod
    def csrf_ok(session: Session, sent: str | None) -> bool:
        return bool(sent) and hmac.compare_digest(session.csrf.encode(), str(sent).encode())

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(32)

    def set_login_nonce(self, request: Request, response: Response, nonce: str) -> None:
        """The sign-in form's nonce, also set (signed) in a cookie the form's post must bring."""
        self._set(response, request, LOGIN_COOKIE, self.signer.dumps(nonce), LOGIN_SECONDS, path="/login")

    def login_nonce_ok(self, request: Request, sent: str | None) -> bool:
        expected = self._unsign(request.cookies.get(LOGIN_COOKIE), LOGIN_SECONDS)
        return bool(expected and sent) and hmac.compare_digest(expected.encode(), str(sent).encode())

    # -- cookies -------------------------------------------------------------------------------

    def _unsign(self, value: str | None, max_age: float) -> str | None:
        if not value:
            return None
        try:
            return str(self.signer.loads(value, max_age=int(max_age)))
        except BadSignature:  # also SignatureExpired
            return None

    @staticmethod
    def _set(response: Response, request: Request, name: str, value: str, max_age: int, path: str = "/") -> None:
        response.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
