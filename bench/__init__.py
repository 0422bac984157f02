"""``tokenfleet bench``: load generator, baselines and reports (see docs/benchmarks.md)."""
