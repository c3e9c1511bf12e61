"""Names every package agrees on, and nothing else: a leaf that imports none of ours.

The packages import one way only, along the data flow, with `cdp` on top wiring them:

    cdp  →  projections  →  identity  →  ingest  →  contracts

A package may import the packages to its right, never one to its left (tests/test_import_direction.py
checks it). `projections` reads what the store (in `cdp`) wrote, so the names of the stored events
live here, where both sides can import them without `projections` importing `cdp`.
"""
