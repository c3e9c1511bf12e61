"""The profile fields of a customer (the envelope's `data.customer`, address flattened): the
golden record's columns, the fields a survivorship rule may name."""
from __future__ import annotations

PROFILE_COLUMNS = (
    "email", "phone", "first_name", "last_name", "date_of_birth", "national_id", "loyalty_id",
    "street", "line2", "city", "postcode", "state", "country",
)
