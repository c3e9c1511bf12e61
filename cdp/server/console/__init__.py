"""The customer-360 console served by `cdp serve`: pages.py (routes, `mount`), sessions.py (sign-in), lookup.py (search)."""
