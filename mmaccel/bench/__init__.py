"""Benchmarks: fidelity on the embedded world (answers) and speed (wall time vs FLOPs)."""
