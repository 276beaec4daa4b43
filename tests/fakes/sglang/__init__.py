"""Test double of SGLang (tests only): see launch_server.py."""
