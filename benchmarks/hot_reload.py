"""Hot-reload benchmarks, each measured in one run (figures and ratios):

1. reaction: atomic copy (rename into place) to servable, event-driven against poll-only at a
   10 s interval (the NIM way), on the real vLLM CPU build;
2. slow `cp -r` (weights written over several seconds): last byte to servable, and whether the
   answers equal those of the same adapter copied atomically;
3. discovery of 1,000 and 10,000 folders against a floor (a bare loop reading each config and
   stat-ing each weights file);
4. bulk: 200 adapters dropped at once on vLLM CPU, time until all are servable.

Run: `.venv/bin/python -m benchmarks.hot_reload [--out benchmarks/results/hot_reload.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchmarks.fixtures import make_synthetic_adapters
from entrypoint.adapters.rank import RankLimit
from entrypoint.sources.folder import FolderSource
from lora_demo import build_adapter, build_base_model
from tests.e2e.server import Server
from tests.e2e.server import slow_copy as write_slowly

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / ".cache" / "test-assets"
INTERVAL = "10"
PROMPT = "Once upon a time there was a small model"


def servable(server: Server, name: str) -> bool:
    return server.http.post("/v1/completions", json={
        "model": name, "prompt": "Hi", "max_tokens": 1}).status_code == 200


def time_until(predicate, timeout: float = 60.0, step: float = 0.01) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(step)
    raise TimeoutError("condition not reached")


def answers(server: Server, name: str) -> list[str]:
    return [server.complete(name, prompt, tokens=16) for prompt in (PROMPT, "Hello world")]


def start_server(work: Path, model: Path, source: Path, *, events: bool, name: str) -> Server:
    log = work / f"{name}.log"
    server = Server({
        "NIM_MODEL_NAME": str(model),
        "NIM_SERVED_MODEL_NAME": "tiny",
        "NIM_PEFT_SOURCE": str(source),
        "NIM_PEFT_REFRESH_INTERVAL": INTERVAL,
        "NIM_MAX_LORA_RANK": "16",
        "NIM_PEFT_WATCH_EVENTS": "true" if events else "false",
        "NIM_LOG_LEVEL": "WARNING",
    }, log).start()
    return server.wait_ready()


def reaction(server: Server, source: Path, library: Path, prefix: str, rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        staging = source / f".{prefix}{i}.tmp"
        shutil.copytree(library / "alpha", staging)
        time.sleep(0.3 + (i * 0.7) % 2)  # land at different points of the poll cycle
        os.replace(staging, source / f"{prefix}{i}")
        times.append(time_until(lambda n=f"{prefix}{i}": servable(server, n)))
    return times


def slow_copy(server: Server, source: Path, library: Path, seconds: float = 4.0) -> dict:
    shutil.copytree(library / "beta", source / "atomic-beta.tmp")
    os.replace(source / "atomic-beta.tmp", source / "atomic-beta")
    time_until(lambda: servable(server, "atomic-beta"))
    write_slowly(library / "beta", source / "slow-beta", seconds=seconds, chunks=20)
    last_byte_to_servable = time_until(lambda: servable(server, "slow-beta"))
    same = answers(server, "slow-beta") == answers(server, "atomic-beta")
    return {"write_seconds": seconds, "last_byte_to_servable_s": round(last_byte_to_servable, 3),
            "answers_equal_atomic_copy": same}


def floor_scan(source: Path) -> int:
    """The least any scanner must do: list the folders, read each config, stat each weights."""
    count = 0
    for entry in os.scandir(source):
        if entry.is_dir():
            json.loads(Path(entry.path, "adapter_config.json").read_bytes())
            os.stat(os.path.join(entry.path, "adapter_model.safetensors"))
            count += 1
    return count


def best_of(fn, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def discovery(work: Path) -> list[dict]:
    results = []
    for count in (1_000, 10_000):
        source = work / f"scale-{count}"
        make_synthetic_adapters(source, count)
        floor = best_of(lambda s=source: floor_scan(s))
        first = best_of(lambda s=source: FolderSource(s, limit=RankLimit(16)).scan())
        scanner = FolderSource(source, limit=RankLimit(16))
        scanner.scan()
        steady = best_of(scanner.scan)
        cli = [str(Path(sys.executable).parent / "lora-entrypoint"), "check-adapters",
               str(source), "--json"]
        start = time.perf_counter()
        checked = subprocess.run(cli, capture_output=True, check=False)
        check_cli = time.perf_counter() - start
        assert len(json.loads(checked.stdout)) == count
        tracemalloc.start()
        scanner.scan()
        after_one = tracemalloc.get_traced_memory()[0]
        for _ in range(20):
            scanner.scan()
        after_many = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        results.append({
            "folders": count,
            "floor_s": round(floor, 4),
            "full_validation_s": round(first, 4),
            "unchanged_pass_s": round(steady, 4),
            "full_validation_over_floor": round(first / floor, 2),
            "unchanged_pass_over_floor": round(steady / floor, 2),
            "memory_growth_over_20_passes_kib": round((after_many - after_one) / 1024, 1),
            "check_adapters_cli_s": round(check_cli, 3),
        })
        shutil.rmtree(source)
    return results


def bulk(server: Server, source: Path, library: Path, count: int = 200) -> dict:
    staging = source.parent / "bulk-staging"
    staging.mkdir()
    for i in range(count):
        shutil.copytree(library / "gamma", staging / f"bulk{i:03d}")
    start = time.monotonic()
    for i in range(count):
        os.replace(staging / f"bulk{i:03d}", source / f"bulk{i:03d}")
    dropped = time.monotonic() - start

    def all_listed() -> bool:
        names = {m["id"] for m in server.http.get("/v1/models").json()["data"]}
        return all(f"bulk{i:03d}" in names for i in range(count))

    listed = time_until(all_listed, timeout=300, step=0.05)
    return {"adapters": count, "drop_s": round(dropped, 3),
            "drop_to_all_servable_s": round(dropped + listed, 3),
            "per_adapter_ms": round((dropped + listed) / count * 1000, 2),
            "last_one_answers": servable(server, f"bulk{count - 1:03d}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hot_reload.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--discovery-only", action="store_true")
    args = parser.parse_args()
    model = build_base_model(ASSETS / "tiny-llama")
    library = ASSETS / "library"
    for name, seed in (("alpha", 11), ("beta", 12), ("gamma", 13)):
        build_adapter(model, library / name, seed=seed)
    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    result: dict = {"machine": {"cpus": os.cpu_count()}, "interval_s": float(INTERVAL)}
    try:
        result["discovery"] = discovery(work)
        print(json.dumps(result["discovery"], indent=1), flush=True)
        if args.discovery_only:
            return
        for mode, events in (("events", True), ("poll_only", False)):
            source = work / f"loras-{mode}"
            source.mkdir()
            server = start_server(work, model, source, events=events, name=mode)
            try:
                times = reaction(server, source, library, "r", args.rounds)
                result[f"reaction_{mode}"] = {
                    "runs_s": [round(t, 3) for t in times],
                    "median_s": round(statistics.median(times), 3),
                    "max_s": round(max(times), 3),
                }
                if events:
                    result["slow_copy"] = slow_copy(server, source, library)
                    result["bulk"] = bulk(server, source, library)
                print(mode, json.dumps({k: v for k, v in result.items()
                                        if k != "discovery"}, indent=1), flush=True)
            finally:
                server.terminate()
        result["reaction_poll_over_events"] = round(
            result["reaction_poll_only"]["median_s"] / result["reaction_events"]["median_s"], 1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
