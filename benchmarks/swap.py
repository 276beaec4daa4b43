"""Weight swaps on the real vLLM CPU build, with adapters of the size users serve (17.8 MiB:
rank 128 on all seven projections of a 1024-wide, 2-layer Llama), each figure from one run:

1. mechanisms, on bare vLLM (no entrypoint): an in-place load (`load_inplace`) against an unload
   and a fresh load: how long the call takes, how many times vLLM opens the adapter's files
   while it generates afterwards (inotify), and its decode tokens/s against an adapter with
   the same weights loaded once;
2. through the entrypoint: decode tokens/s of an adapter updated once (its folder's weights
   copied over) against the same weights never updated, one stream at a time, in alternating
   pairs; the median ratio;
3. memory: add, update, request and remove an adapter, `--cycles` times (300), each under a
   new name; the backend's resident memory (all its processes) every 50 cycles.

Run: `.venv/bin/python -m benchmarks.swap [--cycles 300] [--pairs 15]` (results in
`benchmarks/results/swap.json` and `docs/performance.md`).
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
from pathlib import Path

import httpx
import openai

from lora_demo import WIDE, build_adapter, build_base_model
from tests.e2e.server import Server, clean_env, descendants, free_port
from tests.opens import OpenCounter

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / ".cache" / "test-assets"
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = "Once upon a time there was a small model that wanted to answer every question"
TOKENS = 32


def realistic_assets() -> tuple[Path, dict[str, Path]]:
    """The wide model and three 17.8 MiB adapters for it (built once, seeded)."""
    model = build_base_model(ASSETS / "wide-llama", **WIDE)
    adapters = {name: build_adapter(model, ASSETS / "wide-library" / name, seed=seed,
                                    rank=128, alpha=128, target_modules=ALL_MODULES)
                for name, seed in (("one", 21), ("two", 22), ("three", 23))}
    return model, adapters


def decode_rate(client: openai.OpenAI, model: str) -> float:
    """Tokens/s between the first and the last streamed token of a TOKENS-token completion."""
    stamps = []
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=TOKENS,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True}):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def alternating(client: openai.OpenAI, first: str, second: str, pairs: int) -> dict:
    """`pairs` alternating pairs (first, second); the median of the per-pair ratios."""
    decode_rate(client, first), decode_rate(client, second)  # warm both
    rows = []
    for i in range(pairs):
        order = (first, second) if i % 2 == 0 else (second, first)
        rates = {name: decode_rate(client, name) for name in order}
        rows.append(rates[first] / rates[second])
    return {"pairs": pairs, "median_ratio": round(statistics.median(rows), 3),
            "ratios": [round(r, 3) for r in rows]}


def opens_while_generating(client: openai.OpenAI, model: str, folders: list[Path]) -> int:
    with OpenCounter(folders) as counter:
        for _ in range(3):
            decode_rate(client, model)
        return sum(counter.count().values())


def mechanisms(model: Path, adapters: dict[str, Path], work: Path, pairs: int) -> dict:
    """Bare vLLM: an in-place load against an unload and a fresh load."""
    port = free_port()
    folders = {}
    for name, origin in (("inplace-v1", "one"), ("inplace-v2", "two"), ("fresh-v1", "one"),
                         ("fresh-v2", "two"), ("never", "two")):
        folders[name] = work / "bare" / name
        shutil.copytree(adapters[origin], folders[name])
    env = {**clean_env(), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
           "VLLM_CPU_KVCACHE_SPACE": "1"}
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "wide", "--port", str(port), "--max-model-len", "512",
            "--enable-lora", "--max-lora-rank", "128", "--max-loras", "4",
            "--max-cpu-loras", "8", "--disable-uvicorn-access-log"]
    with (work / "bare-vllm.log").open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, (work / "bare-vllm.log").read_text()[-2000:]
            try:
                if http.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "bare vLLM did not start"
            time.sleep(0.5)

        def call(path: str, **body: object) -> float:
            started = time.perf_counter()
            reply = http.post(path, json=body)
            assert reply.status_code == 200, reply.text
            return time.perf_counter() - started

        call("/v1/load_lora_adapter", lora_name="inplace", lora_path=str(folders["inplace-v1"]))
        call("/v1/load_lora_adapter", lora_name="fresh", lora_path=str(folders["fresh-v1"]))
        call("/v1/load_lora_adapter", lora_name="never", lora_path=str(folders["never"]))
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0)
        inplace_s = call("/v1/load_lora_adapter", lora_name="inplace",
                         lora_path=str(folders["inplace-v2"]), load_inplace=True)
        started = time.perf_counter()
        call("/v1/unload_lora_adapter", lora_name="fresh")
        call("/v1/load_lora_adapter", lora_name="fresh", lora_path=str(folders["fresh-v2"]))
        unload_load_s = time.perf_counter() - started
        return {
            "in_place": {
                "swap_call_ms": round(inplace_s * 1000, 1),
                "opens_in_3_completions": opens_while_generating(
                    client, "inplace", [folders["inplace-v2"]]),
                "tokens_per_s_vs_never_swapped": alternating(client, "inplace", "never", pairs),
            },
            "unload_then_load": {
                "swap_calls_ms": round(unload_load_s * 1000, 1),
                "opens_in_3_completions": opens_while_generating(
                    client, "fresh", [folders["fresh-v2"]]),
                "tokens_per_s_vs_never_swapped": alternating(client, "fresh", "never", pairs),
            },
            "never_swapped_opens_in_3_completions": opens_while_generating(
                client, "never", [folders["never"]]),
        }
    finally:
        os.killpg(process.pid, 15)
        process.wait(60)


def backend_rss_mib(server: Server) -> float:
    """Resident memory of every process the entrypoint started (vLLM's API server, engine)."""
    assert server.process is not None
    total = 0
    for pid in descendants(server.process.pid):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return round(total / 1024, 1)


def through_entrypoint(model: Path, adapters: dict[str, Path], work: Path, *, pairs: int,
                       cycles: int) -> dict:
    source = work / "loras"
    source.mkdir()
    shutil.copytree(adapters["one"], source / "updated")
    shutil.copytree(adapters["two"], source / "never")
    server = Server({"NIM_MODEL_NAME": str(model), "NIM_SERVED_MODEL_NAME": "wide",
                     "NIM_PEFT_SOURCE": str(source), "NIM_PEFT_REFRESH_INTERVAL": "30",
                     "NIM_MAX_LORA_RANK": "128", "NIM_LOG_LEVEL": "WARNING"},
                    work / "serve.log",
                    command=[sys.executable, "-m", "entrypoint", "serve", "--host", "127.0.0.1"],
                    ).start().wait_ready()
    try:
        before = server.adapters()["updated"]["version"]
        shutil.copy(adapters["two"] / "adapter_model.safetensors",
                    source / "updated" / "adapter_model.safetensors")
        server.wait_adapters(lambda a: a["updated"]["version"] != before
                             and a["updated"]["served_version"] == a["updated"]["version"],
                             timeout=60, what="updated swapped")
        assert server.complete("updated") == server.complete("never")
        snapshots = [p for p in server.cache.glob("snapshots/*/*") if p.is_dir()]
        ratio = alternating(server.openai, "updated", "never", pairs)
        result: dict = {
            "adapter_mib": round((adapters["one"] / "adapter_model.safetensors").stat().st_size
                                 / 2**20, 1),
            "updated_vs_never_updated_tokens_per_s": ratio,
            "opens_in_3_completions_after_the_update": opens_while_generating(
                server.openai, "updated", snapshots),
        }
        print(json.dumps(result, indent=1), flush=True)
        rss = {"0": backend_rss_mib(server)}
        versions = [adapters["one"], adapters["two"], adapters["three"]]
        for cycle in range(1, cycles + 1):
            name = f"c{cycle:04d}"
            shutil.copytree(versions[cycle % 3], source / f".{name}")
            os.replace(source / f".{name}", source / name)
            server.wait_served(name, timeout=60)
            version = server.adapters()[name]["version"]
            shutil.copy(versions[(cycle + 1) % 3] / "adapter_model.safetensors",
                        source / name / "adapter_model.safetensors")
            server.wait_adapters(lambda a, n=name, v=version: a[n]["version"] != v
                                 and a[n]["served_version"] == a[n]["version"], timeout=60,
                                 what=f"{name} updated")
            server.complete(name, tokens=4)
            shutil.rmtree(source / name)
            server.wait_unlisted([name], timeout=60)
            if cycle % 50 == 0:
                rss[str(cycle)] = backend_rss_mib(server)
                print(f"cycle {cycle}: backend RSS {rss[str(cycle)]} MiB", flush=True)
        result["backend_rss_mib_by_cycle"] = rss
        return result
    finally:
        server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/swap.json")
    parser.add_argument("--pairs", type=int, default=15)
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--skip-bare", action="store_true")
    args = parser.parse_args()
    model, adapters = realistic_assets()
    work = Path(tempfile.mkdtemp(prefix="swap-bench-"))
    result: dict = {"machine": {"cpus": os.cpu_count()}}
    try:
        if not args.skip_bare:
            result["bare_vllm"] = mechanisms(model, adapters, work, args.pairs)
            print(json.dumps(result, indent=1), flush=True)
        result["entrypoint"] = through_entrypoint(model, adapters, work, pairs=args.pairs,
                                                  cycles=args.cycles)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
