"""The customer-360 console served by `cdp serve` (pages.py; sign-in in sessions.py)."""
from cdp.server.console.pages import mount

__all__ = ["mount"]
