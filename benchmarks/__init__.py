"""Benchmarks and device checks: scripts that print figures (docs/BENCHMARKS.md).

Run them from the repository root (``python -m benchmarks.NAME``); they are never shipped in a Bento.
"""
