"""Locust scenarios of the 10:00 opening, the invariant verifier, `make surge`, and the
nemesis harness of `make chaos` (rigs, nemesis, crowd, chaos, prom)."""

# One request as the harness logs it: started (epoch s), name, outcome, latency ms, ok.
Row = tuple[float, str, str, float, bool]
