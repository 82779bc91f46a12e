"""Benchmarks: accuracy vs KV budget, communication, latency."""
