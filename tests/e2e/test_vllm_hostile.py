"""Hostile folders on the real vLLM CPU build: whatever NIM_PEFT_SOURCE holds, hot reload goes on,
each adapter-like folder says why it is not served, and readiness tells the truth."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.conftest import copy_adapter
from tests.e2e.server import make_source, own_name, tiny_env

pytestmark = [pytest.mark.e2e, pytest.mark.timing]  # (bounds how fast: run alone)


def hostile(library, source, tag: str) -> dict[str, str]:
    """Put hostile entries named `<tag>-...` into `source`; returns name -> expected reason."""
    expected = {}

    def adapter(name: str, config: str | None = None) -> os.PathLike:
        folder = copy_adapter(library / "alpha", source / f"{tag}-{name}")
        if config is not None:
            path = folder / "adapter_config.json"
            path.write_text(config)
            past = time.time() - 60
            os.utime(path, (past, past))
        return folder

    adapter("nested", "[" * 200_000)
    expected[f"{tag}-nested"] = "not valid JSON"
    adapter("words", json.dumps({"r": "eight", "lora_alpha": None, "target_modules": 5}))
    expected[f"{tag}-words"] = "r='eight'"
    with (adapter("huge") / "adapter_config.json").open("wb") as handle:
        handle.truncate(64 << 20)
    expected[f"{tag}-huge"] = "is 67108864 bytes"
    fifo = adapter("fifo")
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")
    expected[f"{tag}-fifo"] = "adapter_model.safetensors is not a regular file"
    outside = copy_adapter(library / "beta", source.parent / f"outside-{tag}")
    (source / f"{tag}-escape").symlink_to(outside)
    expected[f"{tag}-escape"] = "outside NIM_PEFT_SOURCE"
    (source / f"{tag}-loop").symlink_to(source / f"{tag}-loop")  # not an adapter: ignored
    os.mkdir(os.fsencode(source) + f"/{tag}-caf".encode() + b"\xe9")
    expected[f"{tag}-caf\\xe9"] = "not a valid adapter name"
    deep = source / f"{tag}-deep"
    subprocess.run(["sh", "-c", f"mkdir -p {deep} && cd {deep} && i=0; while [ $i -lt 1500 ]; "
                    "do mkdir d && cd d; i=$((i+1)); done"], check=True)
    expected[f"{tag}-deep"] = "no adapter files directly in this folder"
    (source / f"{tag}-file.txt").write_text("not an adapter: ignored")
    return expected


@pytest.fixture(scope="module")
def source(tmp_path_factory, library):
    folder = make_source(tmp_path_factory.mktemp("hostile"), library, {"host-a": "alpha"})
    yield folder
    subprocess.run(["rm", "-rf", str(folder.parent)], check=False)  # deep trees: no recursion


@pytest.fixture(scope="module")
def expected(source, library) -> dict[str, str]:
    return hostile(library, source, "start")


@pytest.fixture(scope="module")
def server(serve_factory, tiny_model, source, expected):
    return serve_factory(
        tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="120", NIM_MAX_LORA_RANK="16"),
        name="hostile",
    ).wait_ready()


def shown(expected: dict[str, str]):
    """Whether a `/v1/adapters` listing shows each expected folder failed with its reason."""

    def ok(adapters: dict[str, dict]) -> bool:
        return all(name in adapters and adapters[name]["state"] == "failed"
                   and reason in (adapters[name]["reason"] or "")
                   for name, reason in expected.items())

    return ok


def good_folders(source) -> set[str]:
    """The adapters the tests put in `source` (host-a and each test's own), not the hostile."""
    return {p.name for p in source.iterdir() if p.is_dir() and not p.is_symlink()
            and not p.name.startswith(("start-", "later-"))}


def check_reasons(server, expected: dict[str, str]) -> None:
    adapters = server.adapters()
    for name, reason in expected.items():
        assert name in adapters, f"{name} not shown: {sorted(adapters)}"
        assert adapters[name]["state"] == "failed" and reason in adapters[name]["reason"], (
            name, adapters[name])
        if name.isascii() and "\\" not in name:
            assert reason in (server.error_of(name) or ""), name
    assert not any("loop" in name or "file" in name for name in adapters)


def test_hostile_folders_at_start_are_shown_with_reasons(server, expected):
    assert server.http.get("/v1/health/ready").status_code == 200
    check_reasons(server, expected)
    assert server.complete("host-a") != server.complete("tiny")


def test_hostile_folders_added_later_never_stop_hot_reload(server, source, library, request):
    good = own_name(request.node.name)
    later = hostile(library, source, "later")
    server.wait_adapters(shown(later), timeout=10, only=later, what="later folders shown")
    check_reasons(server, later)
    started = time.monotonic()
    copy_adapter(library / "beta", source / good)
    took = server.wait_for(lambda: server.error_of(good) is None, timeout=10,
                           what=f"{good} served")
    assert took < 1.0, f"a good adapter took {took:.2f} s after hostile folders"
    assert time.monotonic() - started < 2
    assert server.http.get("/v1/health/ready").status_code == 200


def test_the_source_vanishing_keeps_what_is_served(server, source, library, request):
    good = own_name(request.node.name)
    away = source.with_name("loras-unmounted")
    answer = server.complete("host-a")
    source.rename(away)
    server.wait_adapters(lambda adapters: "NIM_PEFT_SOURCE is unavailable" in
                         (adapters["host-a"]["reason"] or ""), timeout=10, only=["host-a"],
                         what="reason shown")
    assert server.complete("host-a") == answer  # still served
    assert server.http.get("/v1/health/ready").status_code == 200
    away.rename(source)
    copy_adapter(library / "gamma", source / good)
    server.wait_for(lambda: server.error_of(good) is None, timeout=10, what=f"{good} served")
    assert not server.adapters()["host-a"]["reason"]
    errors = [line for line in server.logs().splitlines() if "NIM_PEFT_SOURCE=" in line
              and "ERROR" in line]
    assert len(errors) == 1, errors


def test_no_traceback_and_no_lost_adapter(server, source):
    assert "Traceback" not in server.logs()
    good = good_folders(source)  # host-a, and each earlier test's own adapter
    assert "host-a" in good and good <= set(server.models())
