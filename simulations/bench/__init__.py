"""The ``fedrec bench`` commands: quality, privacy, DP cost, search, serving latency
and robustness."""
