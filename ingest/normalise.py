"""Normalisation of identifiers and profile fields.

Two forms of every value: the *display* form keeps the person's own spelling (trimmed, whitespace
collapsed), the *match* form is what comparisons use (case- and accent-folded). Identifiers that
join records across units (email, phone, national id, loyalty id) are only emitted when they are
usable, so a malformed value never links two people.
"""
from __future__ import annotations

import re
import unicodedata
from datetime import date, datetime, timezone
from functools import lru_cache
from typing import Any

import phonenumbers

from ingest.ranges import EARLIEST, EARLIEST_TEXT, TimeWindow

IDENTIFIER_KINDS = ("email", "phone", "national_id", "loyalty_id")
NAME_FIELDS = ("first_name", "last_name")
ADDRESS_FIELDS = ("street", "line2", "city", "postcode", "state", "country")

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_NON_ALNUM = re.compile(r"[^0-9A-Za-z]")
_SPACES = re.compile(r"\s+")


class InvalidValue(ValueError):
    """A field whose value is well-typed but not usable (an impossible date, say)."""

    def __init__(self, path: str, message: str):
        super().__init__(f"{path}: {message}")
        self.path = path


def display(text: str) -> str:
    """Trimmed, inner whitespace collapsed; spelling and case kept."""
    return " ".join(text.split())


@lru_cache(maxsize=65536)
def fold(text: str) -> str:
    """Match form: case-folded, accents removed, punctuation to spaces, whitespace collapsed."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return " ".join(re.sub(r"[^\w\s]", " ", stripped).split())


def email(raw: str) -> str | None:
    value = raw.strip().lower()
    return value if _EMAIL.match(value) else None


# Numbers that are not one person's: unknown to the numbering plan (not valid, only possible), or
# shared by many callers (freephone, premium, shared-cost …).
_NOT_PERSONAL = frozenset({phonenumbers.PhoneNumberType.UNKNOWN, phonenumbers.PhoneNumberType.TOLL_FREE,
                           phonenumbers.PhoneNumberType.PREMIUM_RATE, phonenumbers.PhoneNumberType.SHARED_COST,
                           phonenumbers.PhoneNumberType.UAN, phonenumbers.PhoneNumberType.VOICEMAIL,
                           phonenumbers.PhoneNumberType.PAGER})


@lru_cache(maxsize=65536)
def phone(raw: str, region: str) -> str | None:
    """E.164 form, or None when the value is not a possible number in that region."""
    try:
        parsed = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(parsed):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def linking_phone(raw: str, region: str) -> str | None:
    """E.164 form when the number may join two records: valid (not only possible) in the numbering
    plan, written in digits (no vanity letters like 0800 FLOWERS) and a number one person answers."""
    normal = phone(raw, region)
    if normal is None or any(ch.isalpha() for ch in raw) or not _personal(normal):
        return None
    return normal


@lru_cache(maxsize=65536)
def _personal(e164: str) -> bool:
    # number_type is UNKNOWN exactly when is_valid_number is False; one call answers both questions
    return phonenumbers.number_type(phonenumbers.parse(e164)) not in _NOT_PERSONAL


def compact_id(raw: str) -> str | None:
    """National and loyalty ids: upper case, separators removed."""
    value = _NON_ALNUM.sub("", raw).upper()
    return value or None


def postcode(raw: str) -> str:
    return _SPACES.sub("", raw).upper()


@lru_cache(maxsize=65536)
def birth_date(raw: str) -> str:
    try:
        value = date.fromisoformat(raw)
    except ValueError:
        raise InvalidValue("data.customer.date_of_birth", f"{raw!r} is not a calendar date") from None
    if value.year < 1900 or value > date.today():
        raise InvalidValue("data.customer.date_of_birth", f"{raw!r} is out of range (1900 to today)")
    return raw


_DEFAULT_WINDOW = TimeWindow()


def event_time(raw: str, window: TimeWindow | None = None) -> str:
    """RFC 3339 in, UTC ISO 8601 out, so times sort and compare as text and as timestamps; a time
    outside `window` (default: 1900 to now + 1 day) is refused rather than stored."""
    window = window or _DEFAULT_WINDOW
    window.refresh()
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidValue("time", f"{raw!r} is not an RFC 3339 date-time") from None
    if value.tzinfo is None:
        raise InvalidValue("time", f"{raw!r} has no UTC offset")
    if raw.endswith("Z") and len(raw) == 20:  # already UTC to the second: the common case, no re-formatting
        if not EARLIEST_TEXT <= raw[:19] <= window.latest_text:
            raise InvalidValue("time", f"{raw!r} is outside {window.describe()}")
        return raw[:19] + "+00:00"
    try:
        utc = value.astimezone(timezone.utc)
    except OverflowError:  # year 1 east of UTC, year 9999 west of it
        raise InvalidValue("time", f"{raw!r} is outside {window.describe()}") from None
    if not EARLIEST <= utc <= window.latest:
        raise InvalidValue("time", f"{raw!r} is outside {window.describe()}")
    return utc.isoformat()


_customers: dict[tuple, tuple[dict[str, Any], dict[str, str]]] = {}
_CUSTOMER_CACHE = 20_000


def _customer_key(raw: dict[str, Any], region: str) -> tuple:
    """Hashable form of a customer block (values are strings or null after validation)."""
    return (region, *((k, tuple(v.items()) if type(v) is dict else v) for k, v in raw.items()))


def customer(raw: dict[str, Any], region: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(profile for display, identifiers for joining) from a validated `data.customer`.

    Memoised: a unit sends the same customer block with every event of a source record, so most
    calls are a lookup. The returned dicts are shared and must be treated as read-only."""
    key = _customer_key(raw, region)
    found = _customers.get(key)
    if found is None:
        if len(_customers) >= _CUSTOMER_CACHE:
            _customers.clear()
        found = _customers[key] = _normalise_customer(raw, region)
    return found


def _normalise_customer(raw: dict[str, Any], region: str) -> tuple[dict[str, Any], dict[str, str]]:
    profile: dict[str, Any] = {}
    identifiers: dict[str, str] = {}
    for field in NAME_FIELDS:
        value = raw.get(field)
        if value:
            value = display(value)
            if value:
                profile[field] = value
    value = raw.get("email")
    if value:
        normal = email(value)
        profile["email"] = normal or display(value)
        if normal:
            identifiers["email"] = normal
    value = raw.get("phone")
    if value:
        normal = phone(value, region)
        profile["phone"] = normal or display(value)
        linking = normal and linking_phone(value, region)
        if linking:
            identifiers["phone"] = linking
    for field in ("national_id", "loyalty_id"):
        value = raw.get(field)
        if value:
            normal = compact_id(value)
            if normal:
                profile[field] = normal
                identifiers[field] = normal
    value = raw.get("date_of_birth")
    if value:
        profile["date_of_birth"] = birth_date(value)
    address = raw.get("address")
    if address:
        for field in ADDRESS_FIELDS:
            value = address.get(field)
            if value:
                value = postcode(value) if field == "postcode" else display(value)
                if value:
                    profile[field] = value
    return profile, identifiers
