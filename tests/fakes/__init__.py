"""Test doubles and stand-ins (tests and benchmarks only)."""
