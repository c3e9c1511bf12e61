"""What each table and column of the unified view means: one line each, for the exported data
dictionary. The exact metric definitions are in docs/metrics.md."""
from __future__ import annotations

from projections.metrics import CONSENT_PURPOSES
from projections.tables import PROFILE_COLUMNS

TABLES = {
    "customers": "One row per unified customer: golden record, facts from their own events, scores as of metric_state.as_of.",
    "customer_business_units": "One row per customer and business unit they are known to.",
    "business_unit_overlap": "Cross-unit overlap: for each pair of units X, Y, how many customers of X are also customers of Y and what they spend.",
    "customer_events": "The cross-channel timeline: every accepted event, attributed to its unified customer.",
    "customer_sources": "Which business-unit source record belongs to which unified customer, and why.",
    "customer_redirects": "Customer ids absorbed by a merge and the survivor they now point to.",
    "metric_state": "The as-of date, store position and fitted model parameters of the current scores.",
}

_CUSTOMERS = {
    "customer_id": "Unified customer id.",
    **{c: f"Golden-record {c.replace('_', ' ')}." for c in PROFILE_COLUMNS},
    "golden_sources": "For each golden-record field, the business_unit:source_id its value came from (survivorship rules: CDP_SURVIVORSHIP).",
    "business_units": "Business units the customer is known to, sorted.",
    "sources": "Number of distinct (business_unit, source_id) records merged into the customer.",
    "events": "Number of events on the customer's timeline.",
    "first_seen": "Time of the customer's first event.",
    "last_seen": "Time of the customer's latest event.",
    "orders": "Number of purchase events.",
    "lifetime_value": "Sum of purchase amounts, rounded to cents (0 without purchases).",
    "avg_order_value": "lifetime_value / orders, rounded to cents; NULL without purchases.",
    "first_purchase_at": "Time of the first purchase.",
    "last_purchase_at": "Time of the latest purchase.",
    "purchase_days": "Distinct UTC calendar days with a purchase (the model's transactions).",
    "preferred_channel": "Channel with the most customer-initiated touches (online, store, phone, email, social); ties alphabetical.",
    "emails_sent": "Distinct email campaigns sent to the customer.",
    "email_open_rate": "Distinct campaigns opened / distinct campaigns sent (4 decimals); NULL if none sent.",
    "email_click_rate": "Distinct campaigns clicked / distinct campaigns sent (4 decimals); NULL if none sent.",
    "email_unsubscribed": "True if the latest email unsubscribe is later than the latest email_marketing consent grant.",
    "calls": "Number of calls, both directions.",
    "complaints": "Calls with outcome 'complaint' plus CSAT feedback scored 1 or 2.",
    "nps_score": "Latest NPS score (0-10).",
    "nps_class": "promoter (9-10), passive (7-8) or detractor (0-6) from nps_score; NULL without NPS feedback.",
    "csat_avg": "Mean CSAT score (1-5), 2 decimals; NULL without CSAT feedback.",
    **{f"consent_{p}": f"Latest consent for {p.replace('_', ' ')} (true granted, false withdrawn, NULL never stated)."
       for p in CONSENT_PURPOSES},
    "recency_days": "Days from the last purchase day to the as-of date; NULL without purchases.",
    "rfm_recency": "1-5: 1 + floor(5 x percent_rank) of recency among buyers, most recent highest.",
    "rfm_frequency": "1-5: 1 + floor(5 x percent_rank) of orders among buyers.",
    "rfm_monetary": "1-5: 1 + floor(5 x percent_rank) of lifetime_value among buyers.",
    "rfm_segment": "champions, loyal, new, potential, at_risk, hibernating, lost (from R and F) or prospect.",
    "lifecycle_stage": "prospect, new, active, at_risk or churned, by the rules in docs/metrics.md.",
    "churn_risk": "1 - P(alive) under the fitted MBG/NBD model, 4 decimals; NULL without purchases.",
    "predicted_value_12m": "Expected purchase days in the next 365 days (MBG/NBD) x expected spend per purchase day (Gamma-Gamma).",
    "tier": "high_value (R+F+M >= 12), potential (>= 8) or regular.",
    "scores_withheld": "True when the customer withdrew profiling consent: recency, RFM, segment, lifecycle stage, "
                       "churn risk, predicted value and tier are not computed (NULL) and they do not count in others' quintiles.",
}

COLUMNS: dict[str, dict[str, str]] = {
    "customers": _CUSTOMERS,
    "customer_business_units": {
        "customer_id": "Unified customer id.", "business_unit": "The business unit.",
        "spend": "Sum of the customer's purchase amounts in this unit, rounded to cents.",
        "orders": "Purchases in this unit.", "first_seen": "First event in this unit.",
        "last_seen": "Latest event in this unit.",
        "interactions": "Calls, emails, social interactions and feedback in this unit.",
    },
    "business_unit_overlap": {
        "unit_x": "Business unit X.", "unit_y": "Business unit Y (X itself on the diagonal).",
        "customers_x": "Customers of X.", "customers_both": "Customers of both X and Y.",
        "share_of_x": "customers_both / customers_x.",
        "spend_in_x": "What the customers of both spend in X.", "spend_in_y": "What they spend in Y.",
        "value_both": "spend_in_x + spend_in_y (spend_in_x on the diagonal).",
    },
    "customer_events": {
        "event_id": "CloudEvents id.", "event_source": "CloudEvents source.", "customer_id": "Unified customer id.",
        "business_unit": "Business unit that sent the event.", "source_id": "The unit's own customer key.",
        "type": "Event type (cdp.purchase, cdp.call, …).", "time": "Event time (UTC).",
        "position": "Position in the event store.",
        "amount": "Purchase amount.", "currency": "Purchase currency.", "order_id": "Order id.",
        "channel": "Purchase channel.", "items": "Purchased items (JSON).", "direction": "Call direction.",
        "duration_seconds": "Call duration.", "outcome": "Call outcome.", "campaign": "Email campaign.",
        "action": "Email or social action.", "platform": "Social platform.", "score": "Feedback score.",
        "kind": "Feedback kind (nps, csat).", "comment": "Feedback comment.", "purpose": "Consent purpose.",
        "granted": "Consent granted (true) or withdrawn (false).",
        "event_name": "Name of a tracked action, page, screen or group (cdp.track, cdp.page, cdp.screen, cdp.group).",
        "properties": "Free-form properties of a collector event, as the unit sent them (JSON).",
        **{c: f"{c.replace('_', ' ').capitalize()} as this event gave it." for c in PROFILE_COLUMNS},
    },
    "customer_sources": {
        "business_unit": "Business unit.", "source_id": "The unit's own customer key.",
        "customer_id": "Unified customer id.", "linked_by": "Rule that linked the record (new_customer for the first).",
        "evidence": "What the rule matched on (JSON).", "position": "Position in the event store.",
    },
    "customer_redirects": {
        "absorbed_id": "Customer id absorbed by a merge.", "survivor_id": "Customer id it now belongs to.",
        "rule": "Rule that merged them.", "evidence": "What the rule matched on (JSON).",
        "position": "Position in the event store.",
    },
    "metric_state": {
        "as_of": "As-of date of the scores (CDP_AS_OF).", "position": "Store position the scores were computed at.",
        "model": "Fitted MBG/NBD (r, alpha, a, b) and Gamma-Gamma (p, q, v) parameters (JSON).",
        "recency_bounds": "For rfm_recency 2..5 the most recency_days that scored at least that, then the fewest scored: how a live batch's customers are scored until the next refresh.",
        "frequency_bounds": "For rfm_frequency 2..5 the fewest orders that scored at least that, then the most scored.",
        "monetary_bounds": "For rfm_monetary 2..5 the least lifetime_value that scored at least that, then the most scored.",
    },
}


def describe(table: str, column: str) -> str:
    return COLUMNS.get(table, {}).get(column, "")
