"""A `lora-entrypoint serve` child process, configured by NIM_* variables, and its clients; the
end-to-end tests' shared helpers (waiting, environments, adapter folders, processes).

Used by the end-to-end tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import httpx

from entrypoint.runtime.net import free_port  # the one free_port (tests import it from here)
from tests.conftest import copy_adapter, install_fake_smi

BIN = Path(sys.executable).parent / "lora-entrypoint"
ROOT = Path(__file__).resolve().parents[2]
FAKES = ROOT / "tests" / "fakes"
READY_TIMEOUT = 240
SGLANG_PROFILE = "sglang-bf16-tp1-pp1-feat_lora"
T = TypeVar("T")


def _shown(value: object, limit: int = 3000) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + " ..."


def wait_until(probe: Callable[[], T], ok: Callable[[T], object] = bool, *,
               timeout: float = 30.0, what: str = "condition", stable: float = 0.0,
               interval: float = 0.05, show: Callable[[T], object] = lambda answer: answer,
               context: Callable[[], str] | None = None) -> float:
    """Ask `probe()` until `ok(answer)` holds (and has held for `stable` seconds on end); the
    seconds until it first held. Past `timeout`: an AssertionError with the last answer."""
    start = time.monotonic()
    since: float | None = None
    while True:
        answer = probe()
        now = time.monotonic()
        if ok(answer):
            since = now if since is None else since
            if now - since >= stable:
                return since - start
        else:
            since = None
        if now - start > timeout:
            held = f" for {stable} s on end" if stable else ""
            raise AssertionError(f"{what}: not reached{held} in {timeout} s; last answer: "
                                 f"{_shown(show(answer))}" + (f"\n{context()}" if context else ""))
        time.sleep(interval)


def holds(probe: Callable[[], T], ok: Callable[[T], object] = bool, *, seconds: float,
          what: str = "condition", interval: float = 0.1,
          show: Callable[[T], object] = lambda answer: answer) -> None:
    """Assert that `ok(probe())` holds at every look for `seconds` (a window in which nothing
    may happen: there is no later state to wait for)."""
    start = time.monotonic()
    while True:
        answer = probe()
        took = time.monotonic() - start
        assert ok(answer), f"{what}: broken after {took:.2f} s; answer: {_shown(show(answer))}"
        if took >= seconds:
            return
        time.sleep(interval)


# vLLM's CPU platform runs its worker in a third process (the multiprocessing executor) where a
# GPU with one device runs it inside the engine-core process; this asks for the GPU's shape. Each
# start then imports vLLM twice, not three times: about 15 s less per start, for ~35 starts. The
# demo and the first-request tests keep the CPU's own three processes (they pass "1").
ONE_ENGINE_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CPU_PROCESSES = {"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment `lora-entrypoint serve` starts in: this process's without its NIM_*
    variables, offline, then `extra`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NIM_")},
            "HF_HUB_OFFLINE": "1", **extra}


class Server:
    """One `lora-entrypoint serve` process and an OpenAI client for its public port."""

    def __init__(self, env: dict[str, str], log: Path, command: list[str] | None = None) -> None:
        self.command = command or [str(BIN), "serve", "--host", "127.0.0.1"]
        self.port = free_port()
        self.log_path = log
        self.cache = log.parent / "cache"
        self.env = clean_env(**{"NIM_SERVER_PORT": str(self.port), "NIM_MAX_MODEL_LEN": "512",
                                "NIM_CACHE_PATH": str(self.cache), **ONE_ENGINE_PROCESS, **env})
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        import openai  # here, not at the top: unit tests import this module's helpers

        self.openai = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after = 0.0

    def start(self) -> Server:
        self._log = self.log_path.open("wb")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            self.command, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=ROOT,
        )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Server:
        """Wait until `/v1/health/ready` answers 200 (the one wait-until-up)."""

        def ready() -> int | str:
            assert self.running, f"serve exited early:\n{self.logs()[-3000:]}"
            try:
                return self.http.get("/v1/health/ready").status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

        wait_until(ready, lambda status: status == 200, timeout=timeout, interval=0.25,
                   what="/v1/health/ready answering 200", context=self._tail)
        self.ready_after = time.monotonic() - self.started_at
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _tail(self) -> str:
        return self.logs()[-3000:]

    def models(self) -> list[str]:
        return [m.id for m in self.openai.models.list().data]

    def adapters(self, headers: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
        """`GET /v1/adapters`: each adapter's record (state, ready, reason, version, ...)."""
        reply = self.http.get("/v1/adapters", headers=headers)
        reply.raise_for_status()
        return {a["name"]: a for a in reply.json()["data"]}

    def backend_port(self) -> int:
        """The port the backend was started on (from its command line in the log)."""
        found = re.search(r"--port (\d+)", self.logs())
        assert found, f"no backend --port in the log:\n{self._tail()}"
        return int(found.group(1))

    def backend_socket(self) -> str:
        """The Unix socket vLLM was started on (from its command line in the log)."""
        found = re.search(r"--uds (\S+)", self.logs())
        assert found, f"no backend --uds in the log:\n{self._tail()}"
        return found.group(1)

    def backend(self, headers: dict[str, str] | None = None) -> httpx.Client:
        """A client of the backend itself, past the entrypoint (tests that act behind its
        back): over vLLM's socket, or to the port of a backend on one."""
        if "--uds " in self.logs():
            return httpx.Client(base_url="http://backend", headers=headers, timeout=60,
                                transport=httpx.HTTPTransport(uds=self.backend_socket()))
        return httpx.Client(base_url=f"http://127.0.0.1:{self.backend_port()}",
                            headers=headers, timeout=60)

    def metric(self, name: str) -> float:
        """The first sample of `name` in `/v1/metrics` (vLLM's own are appended there)."""
        for line in self.http.get("/v1/metrics").text.splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no {name} in /v1/metrics")

    def snapshots(self) -> list[str]:
        """Names of the snapshot folders this server keeps."""
        return sorted(p.name for p in self.cache.glob("snapshots/*/*") if p.is_dir())

    def complete(self, model: str, prompt: str = "Hello world", tokens: int = 12) -> str:
        result = self.openai.completions.create(
            model=model, prompt=prompt, max_tokens=tokens, temperature=0, seed=0
        )
        return result.choices[0].text

    def error_of(self, model: str) -> str | None:
        """The 404 message a request for `model` gets, or None when it is served."""
        import openai

        try:
            self.complete(model, tokens=1)
        except openai.NotFoundError as exc:
            return str(exc)
        return None

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30.0,
                 what: str = "condition", stable: float = 0.0) -> float:
        """Poll `predicate()` until it is true; the seconds that took."""
        return wait_until(predicate, timeout=timeout, what=what, stable=stable,
                          context=self._tail)

    def wait_adapters(self, ok: Callable[[dict[str, dict[str, Any]]], object], *,
                      timeout: float = 30.0, what: str = "adapter states",
                      stable: float = 0.0, headers: dict[str, str] | None = None,
                      only: Iterable[str] | None = None) -> float:
        """Poll `GET /v1/adapters` until `ok(adapters)` holds; the seconds that took. On the
        deadline the last listing is shown (only the records of `only`, when given)."""
        names = None if only is None else list(only)

        def show(listing: dict[str, dict[str, Any]]) -> object:
            return listing if names is None else {n: listing.get(n) for n in names}

        return wait_until(lambda: self.adapters(headers), ok, timeout=timeout, what=what,
                          stable=stable, show=show, context=self._tail)

    def wait_served(self, name: str, timeout: float = 30.0,
                    headers: dict[str, str] | None = None) -> float:
        """Wait until `/v1/adapters` shows `name` ready with the version of its current files."""

        def served(listing: dict[str, dict[str, Any]]) -> bool:
            record = listing.get(name)
            return bool(record and record["ready"] and record["state"] == "ready"
                        and record["served_version"] == record["version"])

        return self.wait_adapters(served, timeout=timeout, what=f"{name} served",
                                  headers=headers, only=[name])

    def wait_unlisted(self, names: Iterable[str], timeout: float = 30.0,
                      stable: float = 0.0, headers: dict[str, str] | None = None) -> float:
        """Wait until `/v1/adapters` lists none of `names`."""
        names = list(names)
        return self.wait_adapters(lambda listing: not set(names) & listing.keys(),
                                  timeout=timeout, stable=stable, only=names, headers=headers,
                                  what=f"{', '.join(names)} no longer listed")

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        # whatever the entrypoint left (it must leave nothing): clean up its group
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.http.close()


class Reusable:
    """A module's server, started on first use and again for the next test once a test has
    stopped it (SIGTERM, a killed backend), so such a test may run in any place."""

    def __init__(self, start: Callable[[], Server]) -> None:
        self.start = start
        self.current: Server | None = None

    def get(self) -> Server:
        if self.current is None or not self.current.running:
            self.current = self.start()
        return self.current


def own_name(test: str, suffix: str = "") -> str:
    """An adapter name of a test's own, from its name: test_foo_bar[x-y], "b" -> foo_bar-x-y-b."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", test.removeprefix("test_")).strip("-")
    return f"{base}-{suffix}" if suffix else base


class Own:
    """One test's adapters in its module's shared source folder: named after the test, so that
    no other test adds, changes or removes them, and removed after it (`cleanup`)."""

    def __init__(self, test: str, source: Path, library: Path, server: Server | None) -> None:
        self.test, self.source, self.library, self.server = test, source, library, server
        self.names: list[str] = []

    def name(self, suffix: str = "") -> str:
        name = own_name(self.test, suffix)
        if name not in self.names:
            self.names.append(name)
        return name

    def path(self, suffix: str = "") -> Path:
        return self.source / self.name(suffix)

    def add(self, origin: str, suffix: str = "") -> str:
        """Copy the library's `origin` into place atomically as this test's adapter."""
        copy_adapter(self.library / origin, self.path(suffix))
        return self.name(suffix)

    def cleanup(self) -> None:
        """Remove this test's folders; wait until a running server no longer lists them."""
        for name in self.names:
            for folder in (self.source / name, *self.source.glob(f".{name}.*")):
                if folder.is_dir() and not folder.is_symlink():
                    shutil.rmtree(folder)
                elif folder.exists() or folder.is_symlink():
                    folder.unlink()
        if self.names and self.server is not None and self.server.running:
            self.server.wait_unlisted(self.names, timeout=60)


def make_source(root: Path, library: Path, adapters: dict[str, str] | None = None) -> Path:
    """`root/loras` holding a copy of the library's adapter `origin` as each `name: origin`."""
    source = root / "loras"
    source.mkdir()
    for name, origin in (adapters or {}).items():
        copy_adapter(library / origin, source / name)
    return source


def tiny_env(model: Path, source: Path, **extra: str) -> dict[str, str]:
    """The NIM_* variables of a server of the tiny test model named `tiny` over `source`."""
    return {"NIM_MODEL_NAME": str(model), "NIM_SERVED_MODEL_NAME": "tiny",
            "NIM_PEFT_SOURCE": str(source), **extra}


def sglang_env(tmp: Path, model: Path, source: Path, **extra: str) -> dict[str, str]:
    """`tiny_env` on SGLang's test double, on a machine whose nvidia-smi reports one H100."""
    smi = install_fake_smi(tmp / "bin", ["NVIDIA H100 80GB HBM3, 81559, 9.0"])
    return {
        "PATH": f"{smi}:{os.environ['PATH']}",
        "PYTHONPATH": str(FAKES),  # `python -m sglang.launch_server` is the double
        "SGLANG_FAKE_LOG": str(tmp / "sglang-requests.jsonl"),
        **tiny_env(model, source, NIM_MODEL_PROFILE=SGLANG_PROFILE, **extra),
    }


def processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, state letter; Z = zombie), read from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry.name)] = (int(fields[1]), fields[0])
    return table


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    entry = processes().get(pid)
    return entry is not None and entry[1] != "Z"


def children_of(pid: int) -> dict[int, str]:
    """Direct children of `pid`: their state letter."""
    return {child: state for child, (parent, state) in processes().items() if parent == pid}


def descendants(pid: int) -> list[int]:
    """Every live process whose parent chain reaches `pid`."""
    parents = {child: parent for child, (parent, state) in processes().items() if state != "Z"}
    found = []
    for child in parents:
        p = child
        while p in parents and p != 1:
            p = parents[p]
            if p == pid:
                found.append(child)
                break
    return found


def find_backend(parent: int) -> int:
    """The pid of the vLLM API server started by the entrypoint `parent`."""
    for pid in children_of(parent):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in cmdline:
            return pid
    raise AssertionError("no vLLM child process found")


def listening_ports(pids: Iterable[int]) -> set[int]:
    """The TCP ports the processes `pids` listen on (their sockets matched in /proc/net)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            continue
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_gone(pids: Iterable[int], *, reaped: bool = False, timeout: float = 5.0) -> None:
    """Wait until none of `pids` runs (with `reaped`: is not even a zombie)."""
    pids = list(pids)

    def left() -> list[int]:
        return [p for p in pids if (Path(f"/proc/{p}").exists() if reaped else alive(p))]

    wait_until(left, lambda still: not still, timeout=timeout, what="processes left behind")


def slow_copy(src: Path, dst: Path, *, seconds: float, chunks: int = 12) -> None:
    """Like a slow `cp -r`: the config first, then the weights a chunk at a time."""
    dst.mkdir()
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    data = (src / "adapter_model.safetensors").read_bytes()
    step = len(data) // chunks + 1
    with (dst / "adapter_model.safetensors").open("wb") as out:
        for i in range(0, len(data), step):
            out.write(data[i:i + step])
            out.flush()
            time.sleep(seconds / chunks)
