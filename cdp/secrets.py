"""Destination secrets, sealed: what the store and the view keep is AES-256-GCM ciphertext, so
anyone who can query the view (or read the event store) sees no usable secret.

The key is CDP_SECRET_KEY (URL-safe base64 of 32 random bytes; give the same one to every process
that delivers, e.g. `cdp serve` on another host), or else `CDP_HOME/secret.key`, created on first
use readable by its owner only. A secret cannot be hashed here, unlike an access key: the webhook's
HMAC signature needs the secret itself, so it is kept encrypted and opened only to sign.
"""
from __future__ import annotations

import base64
import secrets as random

from cdp.config import ConfigError, Settings
from cdp.keyfiles import read_or_create

_PREFIX = "aesgcm1:"
_CONTEXT = b"cdp destination secret"


def _key(settings: Settings) -> bytes:
    if settings.secret_key:
        raw = settings.secret_key
    else:
        raw = read_or_create(settings.home / "secret.key", lambda key: base64.urlsafe_b64encode(key).decode())
    try:
        key = base64.urlsafe_b64decode(raw.encode())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError("CDP_SECRET_KEY: expected URL-safe base64 of 32 bytes "
                          "(python -c \"import secrets,base64;print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())\")")
    return key


def seal(settings: Settings, secret: str) -> str:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = random.token_bytes(12)
    sealed = AESGCM(_key(settings)).encrypt(nonce, secret.encode(), _CONTEXT)
    return _PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode()


def unseal(settings: Settings, sealed: str) -> str:
    """The secret; ConfigError when this process holds another key than the one that sealed it."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not sealed.startswith(_PREFIX):
        raise ConfigError("a destination secret is not sealed in a form this version knows")
    raw = base64.urlsafe_b64decode(sealed[len(_PREFIX):].encode())
    try:
        return AESGCM(_key(settings)).decrypt(raw[:12], raw[12:], _CONTEXT).decode()
    except InvalidTag:
        raise ConfigError("cannot open a destination secret: CDP_SECRET_KEY (or CDP_HOME/secret.key) "
                          "is not the key it was sealed with") from None
