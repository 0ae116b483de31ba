"""Locust scenarios of the 10:00 opening, the invariant verifier, and `make surge`."""

# One request as the harness logs it: started (epoch s), name, outcome, latency ms, ok.
Row = tuple[float, str, str, float, bool]
