"""`make bench`: throughput and latency of the claim endpoint against two baselines."""
