"""Adapters on disk: a folder's files judged (config, weights, names), and snapshots of them."""
