"""`cdp serve`: the read side that owns the view, the HTTP API, and (embedded) the write path for
what arrives over HTTP."""
