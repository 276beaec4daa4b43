"""A seeded random run on the real vLLM CPU build: folder operations, backend faults through the
fault shim, and four clients sending requests the whole time.

Invariants, after each quiet period: every valid folder is served with exactly its current
weights (its answer equals that of the same weights in an untouched reference folder); nothing
removed or never valid is served; a folder whose new files are invalid keeps serving a version
it had. All the time: the base model answers as the base; every adapter answer is the answer of
one whole version (never a mix); no 5xx reaches a client (the shim only breaks admin calls); the
process never exits; no traceback in the log. `CHAOS_OPERATIONS` sets the length (default 300).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import pytest

from entrypoint.adapters.folder import inspect_folder
from tests.chaos_ops import CONFIG, FOLDER_CHANGES, WEIGHTS, change_folder
from tests.e2e.server import free_port, make_source, tiny_env, wait_until

pytestmark = pytest.mark.e2e
NAMES = ("chaos-1", "chaos-2", "chaos-3", "chaos-4")
VARIANTS = ("alpha", "beta", "gamma")
PROMPT = "Once upon a time"
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, library, serve_factory, tiny_model):
    # untouched: what each version answers when loaded fresh
    source = make_source(tmp_path_factory.mktemp("chaos"), library,
                         {f"ref-{variant}": variant for variant in VARIANTS})
    shim_port = free_port()
    server = serve_factory(
        tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="5", NIM_MAX_LORA_RANK="16",
                 NIM_MAX_GPU_LORAS="3", NIM_MAX_CPU_LORAS="4", NIM_SNAPSHOT_GRACE_SECS="2",
                 NIM_PEFT_API_TIMEOUT_SECS="2", SHIM_PORT=str(shim_port)),
        name="chaos", command=[sys.executable, "-m", "tests.e2e.shim_serve"],
    ).wait_ready()
    return server, source, f"http://127.0.0.1:{shim_port}", library


def answer(client: openai.OpenAI, model: str) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


class Clients:
    """Four clients asking random models the whole time; they pause for checks."""

    def __init__(self, server, expected: dict[str, set[str]], base: str) -> None:
        self.server, self.expected, self.base = server, expected, base
        self.stop, self.go = threading.Event(), threading.Event()
        self.go.set()
        self.busy = 0
        self.lock = threading.Lock()
        self.seen: Counter[str] = Counter()
        self.violations: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(4)]

    def run(self, index: int) -> None:
        rng = random.Random(1000 + index)
        client = openai.OpenAI(base_url=self.server.url + "/v1", api_key="none", max_retries=0,
                               timeout=60)
        while not self.stop.is_set():
            self.go.wait()
            with self.lock:
                self.busy += 1
            try:
                model = rng.choice(["tiny", *NAMES])
                try:
                    text = answer(client, model)
                    self.seen["200"] += 1
                    if model == "tiny" and text != self.base:
                        self.violations.append(f"base answered {text!r}, not as the base")
                    elif model != "tiny" and text not in self.expected["any"]:
                        self.violations.append(f"{model} answered {text!r}: no whole version")
                except openai.NotFoundError:
                    self.seen["404"] += 1
                except openai.APIStatusError as exc:
                    self.seen[str(exc.status_code)] += 1
                    self.violations.append(f"{model}: HTTP {exc.status_code}: {exc.message}")
                except openai.APIConnectionError as exc:
                    self.violations.append(f"{model}: connection failed: {exc}")
            finally:
                with self.lock:
                    self.busy -= 1

    def pause(self) -> None:
        self.go.clear()
        while self.busy:
            time.sleep(0.02)


def test_chaos_on_the_real_vllm(setup):
    server, source, shim, library = setup
    rng = random.Random(int(os.environ.get("CHAOS_SEED", "7")))
    operations = int(os.environ.get("CHAOS_OPERATIONS", "300"))
    weights = {v: (library / v / WEIGHTS).read_bytes() for v in VARIANTS}
    config = (library / "alpha" / CONFIG).read_text()
    ref = {v: answer(server.openai, f"ref-{v}") for v in VARIANTS}
    assert len(set(ref.values())) == 3
    by_weights = {weights[v]: ref[v] for v in VARIANTS}
    base = answer(server.openai, "tiny")
    clients = Clients(server, {"any": set(ref.values())}, base)
    ops: Counter[str] = Counter()
    faults: Counter[str] = Counter()
    checks, violations = 0, []
    had: dict[str, set[bytes]] = {}  # weights each name had while valid
    vllm = server.backend()

    def valid_weights(name: str) -> bytes | None:
        folder = source / name
        try:
            json.loads((folder / CONFIG).read_text())
            data = (folder / WEIGHTS).read_bytes()
        except (OSError, ValueError, RecursionError):
            return None
        return data if data in by_weights else None

    def operate() -> None:
        name, variant = rng.choice(NAMES), rng.choice(VARIANTS)
        folder = source / name
        kind = rng.choice(["rename", "rename", "slow", "replace", "replace", "remove", "truncate",
                           "json", "hostile", "fail-load", "timeout", "behind"])
        ops[kind] += 1
        if kind in FOLDER_CHANGES:
            change_folder(kind, source, name, weights=weights[variant], config=config)
        elif kind == "slow":  # a slow `cp`: the config, then the weights in four writes
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            (folder / CONFIG).write_text(config)
            data = weights[variant]
            with (folder / WEIGHTS).open("wb") as out:
                for i in range(0, len(data), len(data) // 4 + 1):
                    out.write(data[i:i + len(data) // 4 + 1])
                    out.flush()
                    time.sleep(0.05)
        elif kind == "fail-load":
            status = rng.choice([500, 503])
            httpx.post(shim + "/__faults", json={"path": LOAD, "status": status,
                                                 "times": rng.randint(1, 3)})
            faults[f"load {status}"] += 1
        elif kind == "timeout":
            path = rng.choice([LOAD, UNLOAD])
            httpx.post(shim + "/__faults", json={"path": path, "delay": 3, "times": 1})
            faults[f"{path} timeout"] += 1
        elif kind == "behind":
            vllm.post("/v1/unload_lora_adapter", json={"lora_name": name})
            faults["unloaded behind our back"] += 1
        if valid_weights(name) is not None:
            had.setdefault(name, set()).add(valid_weights(name))
        time.sleep(rng.random() * 0.3)

    def unsettled() -> list[str]:
        """Why the service has not settled on the folder yet (nothing: settled)."""
        listed = server.adapters()
        served = set(server.models())  # what the port lists (and routes to)
        why = []
        for name in NAMES:
            record = listed.get(name, {})
            state = record.get("state")
            folder = source / name
            seen = f"{name}: {record or 'no record'}"
            if folder.is_dir() and record.get("version") != inspect_folder(folder).fingerprint:
                why.append(f"{seen}: the folder's last change not seen yet")
                continue
            wanted = valid_weights(name)
            if state in ("loading", "removing") or (wanted is not None and state != "ready"):
                why.append(f"{seen}: valid files not ready" if wanted is not None
                           else f"{seen}: still {state}")
            elif wanted is not None and (record["served_version"] != record["version"]
                                         or name not in served):
                why.append(f"{seen}: not serving its current files (listed: {sorted(served)})")
            elif state == "ready" and "retried" in (record["reason"] or ""):
                why.append(f"{seen}: a retry is due")
            elif not folder.is_dir() and name in listed:
                why.append(f"{seen}: removed, still listed")
        return why

    def check() -> None:
        nonlocal checks
        checks += 1
        clients.pause()
        httpx.delete(shim + "/__faults")  # a quiet period: no new faults either
        try:
            wait_until(unsettled, lambda why: not why, timeout=90,
                       what="a quiet adapter folder", context=server._tail)
            for name in NAMES:
                wanted = valid_weights(name)
                error = server.error_of(name)
                if wanted is not None:
                    got = answer(server.openai, name) if error is None else error
                    if got != by_weights[wanted]:
                        violations.append(f"{name}: answers {got!r}, its weights answer "
                                          f"{by_weights[wanted]!r}")
                elif not (source / name).is_dir():
                    if error is None:
                        violations.append(f"{name}: removed but still served")
                    had.pop(name, None)
                elif error is None:
                    got = answer(server.openai, name)
                    if got not in {by_weights[w] for w in had.get(name, set())}:
                        violations.append(f"{name}: invalid files, serves {got!r}, never its own")
        finally:
            clients.go.set()

    for thread in clients.threads:
        thread.start()
    try:
        for i in range(operations):
            operate()
            if i % 30 == 29:
                check()
        check()
    finally:
        clients.stop.set()
        clients.go.set()
        for thread in clients.threads:
            thread.join(timeout=60)
    logs = server.logs()
    report = {"operations": sum(ops.values()), "by kind": dict(ops), "faults": dict(faults),
              "checks": checks, "requests": dict(clients.seen),
              "violations": len(violations) + len(clients.violations)}
    print("chaos:", json.dumps(report))
    Path(os.environ.get("CHAOS_REPORT", "/dev/null")).write_text(json.dumps(report))
    assert server.process.poll() is None, logs[-3000:]
    assert not violations, violations[:5]
    assert not clients.violations, clients.violations[:5]
    assert "Traceback" not in logs, logs[logs.index("Traceback") - 500:][:3000]
    assert clients.seen["200"] > 100
