"""`make demo` as a newcomer runs it: the printed commands, in order, on a fresh server, each
answering what the demo says it will (and what a person can tell apart)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from lora_demo import DEMO_ADAPTERS, DEMO_BASE_ANSWER
from tests.conftest import ASSETS
from tests.e2e.server import BIN, CPU_PROCESSES, Server, wait_until

pytestmark = pytest.mark.e2e

# What the demo's steps answer, in order: the base model (completion, then chat), the adapter
# already there, a hot-added one, the first after its files were replaced, the removed one.
EXPECTED = [
    " " + DEMO_BASE_ANSWER,
    " " + DEMO_BASE_ANSWER,
    " " + DEMO_ADAPTERS["demo-pirate"],
    " " + DEMO_ADAPTERS["demo-poet"],
    " " + DEMO_ADAPTERS["demo-pirate-v2"],
    "404: The model 'demo-poet' does not exist.",
]


def steps(text: str) -> list[tuple[str, str | None]]:
    """The printed instructions as (shell command, printed expectation or None), in order."""
    block = text.split("lora-entrypoint demo is ready on", 1)[1].split("Stop with Ctrl+C", 1)[0]
    lines = [line.strip() for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    found: list[tuple[str, str | None]] = []
    for line in lines:
        if line.startswith(("curl ", "cp ", "rm ")):
            found.append((line, None))
        elif line.startswith("-> "):
            assert found and found[-1][0].startswith("curl ") and found[-1][1] is None, line
            found[-1] = (found[-1][0], line[3:])
    return found


def printed(expectation: str) -> str:
    """A printed expectation (`" text"` or `404: "message"`) as `answer` gives it."""
    if expectation.startswith("404: "):
        return "404: " + json.loads(expectation[5:])
    return json.loads(expectation)


def answer(command: str) -> str:
    """What a completion or chat command answers: its text, or `404: message`."""
    reply = json.loads(subprocess.run(command, shell=True, capture_output=True, text=True,
                                      check=True).stdout)
    if "error" in reply:
        assert reply["error"]["code"] == "model_not_found", reply
        return "404: " + reply["error"]["message"]
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", reply  # the whole sentence, then EOS
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_the_demos_own_commands_show_each_answer_change(tmp_path):
    log = tmp_path / "demo.log"
    server = Server({"NIM_CACHE_PATH": str(ASSETS / "demo-cache"), **CPU_PROCESSES}, log,
                    command=[str(BIN), "demo"])
    server.start()
    try:
        server.wait_ready()
        server.wait_for(lambda: "Stop with Ctrl+C" in server.logs(), timeout=10,
                        what="instructions printed")
        commands = steps(server.logs())
        shown = [printed(expected) for _, expected in commands if expected is not None]
        assert shown == EXPECTED, commands
        answers, changed = [], False
        for command, expected in commands:
            if not command.startswith("curl "):
                subprocess.run(command, shell=True, check=True)
                changed = True
            elif expected is None:
                models = json.loads(subprocess.run(command, shell=True, capture_output=True,
                                                   text=True, check=True).stdout)
                assert {m["id"] for m in models["data"]} >= {"tiny-llama", "demo-pirate"}
            elif changed:  # the folder just changed: answered as printed within seconds
                wanted = printed(expected)
                wait_until(lambda c=command: answer(c), lambda a, w=wanted: a == w,
                           timeout=30, interval=0.2, what=command)
                answers.append(wanted)
                changed = False
            else:  # the very first requests of this server answer as printed at once
                answers.append(answer(command))
        assert answers == EXPECTED
        assert "died unexpectedly" not in server.logs()
    finally:
        assert server.terminate() == 0
