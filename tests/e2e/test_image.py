"""The container image, built by `make image` and run exactly as the README's `docker run` shows
(with podman, docker's command line), on the CPU image: mounted model and adapter folders, `-e`
variables only.

Skipped, with one line saying so, where no container engine works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.server import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
TAG = "lora-entrypoint:cpu"
USER = "4321:4321"  # a host user that is not root and not the image's default (1000)


def _engine() -> str | None:
    for name in ("podman", "docker"):
        if shutil.which(name) and subprocess.run([name, "info"], capture_output=True,
                                                 timeout=60).returncode == 0:
            return name
    return None


ENGINE = _engine()
pytestmark = [pytest.mark.skipif(
    ENGINE is None, reason="no container engine (podman or docker) works here: the container "
    "tests did not run (apt-get install podman runc mmdebstrap to run them)"),
    pytest.mark.timing]  # (bounds how fast: run alone)


@pytest.fixture(scope="module")
def engine_env() -> dict[str, str]:
    """The environment `make image` says the engine needs (CONTAINERS_CONF on some hosts)."""
    started = time.monotonic()
    alone = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(["make", "image"], cwd=ROOT, capture_output=True, text=True,
                            timeout=1800, env=alone)  # as typed, not as a sub-make of make test
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.startswith(f"make image: building {TAG} with {ENGINE}"), \
        result.stdout[:300]
    print(f"\nmake image: {time.monotonic() - started:.0f} s")
    env = dict(os.environ)
    needed = re.search(r"needs CONTAINERS_CONF=(\S+)", result.stdout)
    if needed:
        env["CONTAINERS_CONF"] = needed.group(1)
    return env


def engine(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    assert ENGINE is not None
    return subprocess.run([ENGINE, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def readme_run_command() -> str:
    """The README's `docker run` (continuation lines joined)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^docker run -d --name lora .*?lora-entrypoint:cpu$", text, re.M | re.S)
    assert match, "the README shows no `docker run -d --name lora ... lora-entrypoint:cpu`"
    return match.group(0).replace("\\\n", " ")


class Container:
    """One container started from the README's command, in a folder laid out as it expects."""

    def __init__(self, env: dict[str, str], home: Path, tiny_model: Path, *,
                 user: str = USER) -> None:
        self.env, self.home, self.port = env, home, free_port()
        self.name = f"lora-test-{os.getpid()}-{self.port}"
        uid, gid = (int(part) for part in user.split(":"))
        model = home / ".cache" / "demo" / "tiny-llama"
        shutil.copytree(tiny_model, model)
        for folder in (home / "loras", home / "cache"):
            folder.mkdir()
        for path in [home / "loras", home / "cache", model, *model.iterdir()]:
            os.chown(path, uid, gid)  # the host user's own files, as after a plain copy
        command = readme_run_command()
        for old, new in (("docker run -d --name lora ", f"{ENGINE} run -d --name {self.name} "),
                         ("-p 8000:8000", f"-p 127.0.0.1:{self.port}:8000"),
                         ('"$(id -u):$(id -g)"', user)):
            assert old in command, f"the README's command has no {old!r}: {command}"
            command = command.replace(old, new)
        self.uid = uid
        self.started = time.monotonic()
        result = subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        self.url = f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        result = engine(self.env, "logs", self.name)
        return result.stdout + result.stderr

    def status(self) -> str:
        return engine(self.env, "inspect", "--format", "{{.State.Status}}", self.name).stdout

    def get(self, path: str) -> httpx.Response | None:
        try:
            return httpx.get(self.url + path, timeout=10)
        except httpx.HTTPError:
            return None

    def wait_ready(self) -> float:
        waited = wait_until(lambda: self.get("/v1/health/ready"),
                            lambda r: r is not None and r.status_code == 200, timeout=400,
                            interval=0.25, what="ready on /v1/health/ready",
                            show=lambda r: r and r.text,
                            context=lambda: f"{self.status()}\n{self.logs()[-4000:]}")
        return time.monotonic() - self.started if waited is not None else 0.0

    def models(self) -> list[str]:
        answer = self.get("/v1/models")
        return [m["id"] for m in answer.json()["data"]] if answer and answer.is_success else []

    def complete(self, model: str) -> tuple[int, str]:
        answer = httpx.post(self.url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": "Hello", "max_tokens": 12, "temperature": 0,
            "ignore_eos": True})
        return answer.status_code, (answer.json()["choices"][0]["text"]
                                    if answer.is_success else answer.text)

    def add(self, library: Path, source: str, name: str) -> None:
        """Copy an adapter in on the host as its user would: beside, then renamed into place."""
        tmp = self.home / "loras" / f".{name}.tmp"
        shutil.copytree(library / source, tmp)
        for path in [tmp, *tmp.iterdir()]:
            os.chown(path, self.uid, self.uid)
            path.chmod(0o755 if path.is_dir() else 0o644)
        os.replace(tmp, self.home / "loras" / name)

    def remove(self) -> None:
        engine(self.env, "rm", "-f", "-v", self.name)


@pytest.fixture(scope="module")
def container(engine_env, tmp_path_factory, tiny_model):
    box = Container(engine_env, tmp_path_factory.mktemp("container"), tiny_model)
    took = box.wait_ready()
    print(f"\ncontainer ready in {took:.1f} s")
    yield box
    box.remove()


def test_an_adapter_copied_in_on_the_host_is_served_then_removed(container, library):
    container.add(library, "alpha", "ctr-added")
    took = wait_until(container.models, lambda names: "ctr-added" in names, timeout=30,
                      interval=0.02, what="ctr-added in /v1/models")
    print(f"\nserved {took:.2f} s after the rename on the host")
    assert took < 5, "inotify events should cross the bind mount (the interval is 10 s)"
    status, text = container.complete("ctr-added")
    assert status == 200 and text != container.complete("tiny-llama")[1]
    shutil.rmtree(container.home / "loras" / "ctr-added")
    wait_until(lambda: container.complete("ctr-added")[0], lambda status: status == 404,
               timeout=30, interval=0.05, what="404 once the folder is removed")


def test_changed_weights_are_served(container, library):
    container.add(library, "alpha", "ctr-changed")
    container.add(library, "beta", "ctr-beta")
    wait_until(container.models, lambda names: {"ctr-changed", "ctr-beta"} <= set(names),
               timeout=30, what="both adapters served")
    before, beta = container.complete("ctr-changed"), container.complete("ctr-beta")
    assert before[0] == beta[0] == 200 and before[1] != beta[1]
    weights = container.home / "loras" / "ctr-changed" / "adapter_model.safetensors"
    tmp = weights.with_name(".new.safetensors")
    shutil.copyfile(library / "beta" / "adapter_model.safetensors", tmp)
    os.chown(tmp, container.uid, container.uid)
    tmp.chmod(0o644)
    os.replace(tmp, weights)
    wait_until(lambda: container.complete("ctr-changed"), lambda answer: answer == beta,
               timeout=30, interval=0.1, what="ctr-changed answering with the new weights")


def test_healthcheck_passes_and_orphans_are_reaped(container):
    health = engine(container.env, "healthcheck", "run", container.name)
    assert health.returncode == 0, health.stdout + health.stderr
    for _ in range(3):  # helpers that exit and leave children behind, as the backend's do
        engine(container.env, "exec", container.name, "sh", "-c", "(sleep 1 &)")
    time.sleep(3)
    table = engine(container.env, "top", container.name, "pid", "ppid", "state", "args").stdout
    assert "lora-entrypoint serve" in table and "vllm" in table
    zombies = [line for line in table.splitlines()[1:] if line.split()[2].startswith("Z")]
    assert not zombies, table


def test_files_written_belong_to_the_user(container, engine_env):
    snapshots = list((container.home / "cache").rglob("*"))
    assert snapshots, "the service wrote nothing into its cache folder"
    owners = {(path.stat().st_uid, path.stat().st_gid) for path in snapshots}
    assert owners == {(container.uid, container.uid)}, owners
    loras = list((container.home / "loras").rglob("*"))
    assert {path.stat().st_uid for path in loras} <= {container.uid}  # nothing written there
    default = engine(engine_env, "run", "--rm", "--entrypoint", "id", TAG)
    assert default.stdout.startswith("uid=1000"), default.stdout + default.stderr


def test_stop_is_graceful_and_leaves_nothing(engine_env, tmp_path, tiny_model, library):
    box = Container(engine_env, tmp_path, tiny_model)
    try:
        box.add(library, "gamma", "ctr-stop")
        box.wait_ready()
        wait_until(box.models, lambda names: "ctr-stop" in names, timeout=30,
                   what="ctr-stop served")
        started = time.monotonic()
        stopped = engine(engine_env, "stop", "-t", "30", box.name, timeout=60)
        took = time.monotonic() - started
        assert stopped.returncode == 0, stopped.stderr
        code = engine(engine_env, "inspect", "--format", "{{.State.ExitCode}}", box.name)
        assert code.stdout.strip() == "0", box.logs()[-3000:]
        assert took < 30
        logs = box.logs()
        assert "received SIGTERM: stopping" in logs
        stop = logs.index("received SIGTERM: stopping")
        assert "Traceback" not in logs[:stop], logs[:stop][-3000:]
        # After the stop, none of ours. vLLM's own shutdown can race (seen once in CI):
        # AsyncLLM.shutdown stops the engine core before it cancels its output handler, which
        # may then log an EngineDeadError traceback; that one, and only that one, is vLLM's.
        for line in logs[stop:].splitlines():
            if "Traceback" in line:
                assert line.startswith("(APIServer") and "[async_llm.py:" in line and \
                    "EngineDeadError: EngineCore encountered an issue" in logs[stop:], \
                    logs[stop:][-3000:]
        assert not list((tmp_path / "cache" / "snapshots").glob("*/*")), "snapshots left"
    finally:
        box.remove()


def test_an_unreadable_model_is_one_clear_line(engine_env, tmp_path, tiny_model):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "model.safetensors").chmod(0o600)  # root's, as copied by root
    started = time.monotonic()
    result = engine(engine_env, "run", "--rm", "-v", f"{model}:/opt/models/base:ro",
                    "-e", "NIM_MODEL_NAME=/opt/models/base", TAG)
    assert result.returncode == 2, result.stdout + result.stderr
    assert time.monotonic() - started < 60
    lines = [line for line in result.stderr.splitlines() if "healthcheck" not in line]
    assert lines[-1] == ("error: NIM_MODEL_NAME=/opt/models/base: model.safetensors cannot be "
                         "read by this user (uid 1000); make the model readable (chmod -R a+rX) "
                         "or run as its owner (docker run -u UID:GID)"), result.stderr


def test_the_image_reads_adapters_from_an_s3_store(engine_env, s3_store, library):
    """The image carries the S3 client: `check-adapters s3://...` in the container, against the
    store on the host's loopback, judges what the store holds (by its URL)."""
    client = s3_store.client()
    client.create_bucket(Bucket="image-source")
    for path in (library / "alpha").iterdir():
        client.put_object(Bucket="image-source", Key=f"loras/alpha/{path.name}",
                          Body=path.read_bytes())
    variables = [f"--env={k}={v}" for k, v in s3_store.env().items()]
    result = engine(engine_env, "run", "--rm", "--network", "host", *variables,
                    "--entrypoint", "lora-entrypoint", TAG, "check-adapters", "--json",
                    "s3://image-source/loras", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    found = json.loads(result.stdout)
    assert [(a["name"], a["valid"], a["path"]) for a in found] == [
        ("alpha", True, "s3://image-source/loras/alpha/")]
