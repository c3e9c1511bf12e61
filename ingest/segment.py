"""Segment's tracking API (the spec its SDKs and tag managers speak) as the platform's CloudEvents.

| Segment call | CloudEvent `type` | `data` besides `business_unit` and `customer` |
|---|---|---|
| `identify` | `cdp.identify` | `properties.anonymous_id` when it carries both ids (reserved traits fill `customer`) |
| `track` "Order Completed" | `cdp.purchase` | `order_id`, `amount` (revenue, else total), `currency`, `items` from `products` |
| any other `track` | `cdp.track` | `event_name` (the event), `properties` |
| `page` / `screen` | `cdp.page` / `cdp.screen` | `event_name` (the name), `properties` |
| `group` | `cdp.group` | `event_name` (the groupId), `properties` (the traits) |
| `alias` | `cdp.alias` | `properties.previous_id` |

`customer.source_id` is the `userId`, or `anonymous:<anonymousId>` for a visitor not yet known;
`messageId` is the CloudEvent `id` and `<unit>/segment` its `source`, so a resend is a duplicate.
An identify carrying both ids, or an alias, names the visitor's earlier id in the event itself, so
whoever resolves it (`cdp serve` embedded, or a `cdp worker`) stitches the visitor onto the user.
Reserved traits (`identify`'s `traits`, else `context.traits`): `email`, `phone`, `firstName`,
`lastName` (else `name`, split at its first space), `birthday`, `address{street, city, postalCode,
state, country}`.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

CALLS = ("identify", "track", "page", "screen", "group", "alias")
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
ORDER_COMPLETED = "Order Completed"
ANONYMOUS = "anonymous:"
UNIT_FIELD = "business_unit"  # a message may name its unit in `context.business_unit`


class NotMappable(ValueError):
    """A Segment message that cannot become an event; the message says why."""


def anonymous_source(anonymous_id: str) -> str:
    return ANONYMOUS + str(anonymous_id)


def named_unit(message: dict[str, Any]) -> str | None:
    context = message.get("context")
    return context.get(UNIT_FIELD) if isinstance(context, dict) else None


def _traits(message: dict[str, Any], call: str) -> dict[str, Any]:
    traits = message.get("traits") if call == "identify" else (message.get("context") or {}).get("traits")
    return traits if isinstance(traits, dict) else {}


def _customer(source_id: str, traits: dict[str, Any]) -> dict[str, Any]:
    customer: dict[str, Any] = {"source_id": source_id}
    for ours, theirs in (("email", "email"), ("phone", "phone"), ("first_name", "firstName"),
                         ("last_name", "lastName")):
        if traits.get(theirs) is not None:
            customer[ours] = str(traits[theirs])
    if "first_name" not in customer and "last_name" not in customer:
        customer.update(_split_name(traits.get("name")))
    birthday = traits.get("birthday")
    if isinstance(birthday, str) and len(birthday) >= 10:
        customer["date_of_birth"] = birthday[:10]
    address = traits.get("address")
    if isinstance(address, dict):
        mapped = {ours: str(address[theirs]) for ours, theirs in (
            ("street", "street"), ("city", "city"), ("postcode", "postalCode"), ("state", "state"),
            ("country", "country")) if address.get(theirs) is not None}
        if mapped:
            customer["address"] = mapped
    return customer


def _split_name(name: Any) -> dict[str, str]:
    """The `name` trait (a full name, which many SDK users send instead of firstName and lastName)
    as first and last name, as most CRMs split a full name: the first word, and the rest (a middle
    name lands in the last name); a single word is a first name. Without it such a user's records
    carry no name for identity resolution to compare."""
    words = str(name).split() if isinstance(name, (str, int)) else []
    return {k: v for k, v in (("first_name", " ".join(words[:1])), ("last_name", " ".join(words[1:]))) if v}


def _purchase(properties: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {"order_id": str(properties.get("order_id") or properties.get("orderId") or ""),
                            "currency": str(properties.get("currency") or "USD").upper(), "channel": "web"}
    amount = next((properties[k] for k in ("revenue", "total", "value") if properties.get(k) is not None), None)
    if amount is not None:
        data["amount"] = amount
    products = properties.get("products")
    if isinstance(products, list):
        data["items"] = [{k: v for k, v in (("sku", str(p.get("sku") or p.get("product_id") or "")),
                                              ("quantity", p.get("quantity", 1)),
                                              ("unit_price", p.get("price"))) if v is not None}
                         for p in products if isinstance(p, dict)]
    return data


def to_cloudevent(message: Any, unit: str, call: str | None = None) -> dict[str, Any]:
    """The CloudEvent for one Segment message sent for `unit` (`call` when the path names it)."""
    if not isinstance(message, dict):
        raise NotMappable("a message must be a JSON object")
    call = message.get("type") or call
    if call not in CALLS:
        raise NotMappable(f"unknown message type {call!r} (one of {', '.join(CALLS)})")
    user_id, anonymous_id = message.get("userId"), message.get("anonymousId")
    if user_id in (None, "") and anonymous_id in (None, ""):
        raise NotMappable("a message needs a userId or an anonymousId")
    source_id = str(user_id) if user_id not in (None, "") else anonymous_source(anonymous_id)
    properties = message.get("properties") if isinstance(message.get("properties"), dict) else {}
    data: dict[str, Any] = {"business_unit": unit, "customer": _customer(source_id, _traits(message, call))}
    if call == "identify":
        kind = "cdp.identify"
        if user_id not in (None, "") and anonymous_id not in (None, "") and str(anonymous_id) != str(user_id):
            data["properties"] = {"anonymous_id": str(anonymous_id)}
    elif call == "track" and message.get("event") == ORDER_COMPLETED:
        kind = "cdp.purchase"
        data.update(_purchase(properties))
    elif call == "alias":
        kind = "cdp.alias"
        data["properties"] = {"previous_id": str(message.get("previousId") or "")}
    else:
        kind = f"cdp.{call}"
        name = {"track": message.get("event"), "group": message.get("groupId")}.get(call, message.get("name"))
        if name is not None:
            data["event_name"] = str(name)
        traits = message.get("traits") if call == "group" else properties
        data["properties"] = traits if isinstance(traits, dict) else {}
    time = message.get("timestamp") or message.get("originalTimestamp") or datetime.now(timezone.utc).isoformat()
    return {"specversion": "1.0", "id": str(message.get("messageId") or uuid.uuid4()), "source": f"{unit}/segment",
            "type": kind, "time": time, "subject": source_id, "datacontenttype": "application/json", "data": data}
