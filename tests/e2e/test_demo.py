"""`make demo` as a newcomer runs it: the printed curl commands, in order, on a fresh server."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from tests.conftest import ASSETS
from tests.e2e.server import BIN, Server

pytestmark = pytest.mark.e2e


def test_the_demos_own_curl_commands_work_first_time(tmp_path):
    log = tmp_path / "demo.log"
    server = Server({"NIM_CACHE_PATH": str(ASSETS / "demo-cache")}, log,
                    command=[str(BIN), "demo"])
    server.start()
    try:
        server.wait_ready()
        server.wait_for(lambda: "Try the adapter already there:" in server.logs(), timeout=10,
                        what="instructions printed")
        text = server.logs()
        block = text.split("Try the adapter already there:", 1)[1].split("Hot-add", 1)[0]
        commands = re.sub(r"\\\n\s*", " ", block).strip().splitlines()
        commands = [c.strip() for c in commands if c.strip().startswith("curl")]
        assert len(commands) == 2, commands
        models = json.loads(subprocess.run(commands[0], shell=True, capture_output=True,
                                           text=True, check=True).stdout)
        assert {m["id"] for m in models["data"]} >= {"tiny-llama", "demo-pirate"}
        answer = json.loads(subprocess.run(commands[1], shell=True, capture_output=True,
                                           text=True, check=True).stdout)
        assert answer["choices"][0]["text"], answer  # the very first completion of this server
        assert "died unexpectedly" not in server.logs()
    finally:
        assert server.terminate() == 0
