"""Reconcile: what the sources want against what the backend serves, and the calls that
bring them together."""
