"""Test tooling shared by tests, benchmarks and load tests (a real server on loopback, crafted images)."""
