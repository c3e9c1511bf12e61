"""Who is asking: the API key from the request (Bearer, Basic user name, or Segment's `writeKey`),
checked against the key ring, and a token bucket per key (429 with Retry-After when empty)."""
from __future__ import annotations

import base64
import hmac
import math
import threading
import time

from starlette.requests import Request

from cdp.keys import Key, KeyRing, digest


class Denied(Exception):
    """An HTTP refusal: status, code and message for the JSON error body."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def token_of(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() == "basic":
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return user or password or None
    return None


LOCAL_ACTOR_HEADER = "x-cdp-actor"  # the local CLI names its user (only with the server's local key)


def actor_of(key: Key, request: Request | None = None) -> str:
    """Who the audit trail names: `key:<key id>`, or the local user the CLI sent with the
    server's local key."""
    if key.key_id == "local":
        named = request.headers.get(LOCAL_ACTOR_HEADER, "") if request is not None else ""
        return named if named.startswith("local") and len(named) <= 100 else "local"
    return f"key:{key.key_id}"


class RateLimiter:
    """`rate` requests per second per key, bursts up to twice that."""

    def __init__(self, rate: float):
        self.rate = rate
        self.burst = max(rate * 2, 1.0)
        self.buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill)
        self.lock = threading.Lock()

    def take(self, key_id: str) -> float:
        """0 when allowed, else the seconds until a request would be."""
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get(key_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self.buckets[key_id] = (tokens - 1, now)
                return 0.0
            self.buckets[key_id] = (tokens, now)
            return (1 - tokens) / self.rate


class Gate:
    def __init__(self, ring: KeyRing, limiter: RateLimiter, local: Key | None = None, local_token: str | None = None):
        self.ring = ring
        self.limiter = limiter
        self.local, self.local_token = local, local_token
        self.local_digest = digest(local_token) if local_token else None

    def admit(self, token: str | None, scope: str, group: bool = False) -> Key:
        """The key allowed to do `scope` (group: group-wide only), or a Denied to answer with."""
        if not token:
            raise Denied(401, "unauthorized", "an API key is needed: Authorization: Bearer KEY (or Basic KEY:)",
                         {"WWW-Authenticate": 'Bearer realm="cdp"'})
        return self.admit_digest(digest(token), scope, group)

    def known(self, wanted: str) -> Key | None:
        """The live (not revoked) key whose SHA-256 digest is `wanted`."""
        if self.local_digest is not None and hmac.compare_digest(wanted, self.local_digest):
            return self.local
        return self.ring.by_digest.get(wanted)

    def admit_digest(self, wanted: str, scope: str, group: bool = False) -> Key:
        """As `admit`, for the key whose SHA-256 digest is `wanted` (what a console session keeps)."""
        key = self.known(wanted)
        if key is None:
            raise Denied(401, "unauthorized", "unknown or revoked API key", {"WWW-Authenticate": 'Bearer realm="cdp"'})
        if not key.may(scope):
            raise Denied(403, "forbidden", f"this key's scope is {key.scope}; {scope} is needed")
        if group and not key.group:
            raise Denied(403, "forbidden", f"this key reads for {key.unit} only; a group-wide key is needed")
        wait = self.limiter.take(key.key_id)
        if wait:
            raise Denied(429, "rate_limited", "too many requests for this key",
                         {"Retry-After": str(max(1, math.ceil(wait)))})
        return key
