"""A `lora-entrypoint serve` child process, configured by NIM_* variables, and its clients.

Used by the end-to-end tests and the benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from entrypoint.service import free_port

BIN = Path(sys.executable).parent / "lora-entrypoint"
ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 240


class Server:
    """One `lora-entrypoint serve` process and an OpenAI client for its public port."""

    def __init__(self, env: dict[str, str], log: Path, command: list[str] | None = None) -> None:
        self.command = command or [str(BIN), "serve", "--host", "127.0.0.1"]
        self.port = free_port()
        self.log_path = log
        self.cache = log.parent / "cache"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("NIM_")},
            "HF_HUB_OFFLINE": "1",
            "NIM_SERVER_PORT": str(self.port),
            "NIM_MAX_MODEL_LEN": "512",
            "NIM_CACHE_PATH": str(self.cache),
            **env,
        }
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
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

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited early:\n{self.logs()[-3000:]}"
            try:
                if self.http.get("/v1/health/ready").status_code == 200:
                    self.ready_after = time.monotonic() - self.started_at
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"not ready after {timeout} s:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def models(self) -> list[str]:
        return [m.id for m in self.openai.models.list().data]

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
        try:
            self.complete(model, tokens=1)
        except openai.NotFoundError as exc:
            return str(exc)
        return None

    def wait_for(self, predicate, timeout: float = 30.0, what: str = "condition") -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if predicate():
                return time.monotonic() - start
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached in {timeout} s:\n{self.logs()[-3000:]}")

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


def tiny_env(model: Path, source: Path, **extra: str) -> dict[str, str]:
    """The NIM_* variables of a server of the tiny test model named `tiny` over `source`."""
    return {"NIM_MODEL_NAME": str(model), "NIM_SERVED_MODEL_NAME": "tiny",
            "NIM_PEFT_SOURCE": str(source), **extra}


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
