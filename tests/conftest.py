"""Shared by all tests: pytester runs the harness tests' planted suites (tests/harness)."""

pytest_plugins = ["pytester"]
