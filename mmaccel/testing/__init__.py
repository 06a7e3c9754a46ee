"""Helpers for tests and benchmarks: tiny random-weight models of the real transformers classes."""
