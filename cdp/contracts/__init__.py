"""Names every package agrees on, and nothing else: a leaf that imports none of ours.

The packages import one way only, along the data flow, with `cdp` on top wiring them:

    cdp  →  projections  →  identity  →  ingest  →  cdp.contracts

A package may import the packages to its right, never one to its left (tests/test_import_direction.py
checks it). `projections` reads what the store (in `cdp`) wrote, so the names of the stored events
live here, beside the domain events they name, in a leaf that every package may import without
importing the rest of `cdp` (`cdp/__init__.py` imports nothing, so importing this leaf runs none
of `cdp`'s wiring).
"""
