"""Peers the tests and benchmarks compare k2local against, loaded safely."""
