"""Hot reload on the real vLLM CPU build: half-copied folders, changed weights, instant reaction.

The refresh interval is 120 s, so anything that happens within seconds happened through
file-system events, not the poll.
"""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

from tests.conftest import copy_adapter
from tests.e2e.server import holds, make_source, slow_copy, tiny_env
from tests.opens import OpenCounter

pytestmark = [pytest.mark.e2e, pytest.mark.timing]  # (bounds how fast: run alone)
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 12)


@pytest.fixture(scope="module")
def source(tmp_path_factory, library):
    return make_source(tmp_path_factory.mktemp("hot"), library,
                       {"alpha": "alpha", "beta": "beta", "gamma": "gamma"})


@pytest.fixture(scope="module")
def server(serve_factory, tiny_model, source):
    return serve_factory(
        tiny_env(tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="120", NIM_MAX_LORA_RANK="16",
                 NIM_JSONL_LOGGING="true", NIM_SNAPSHOT_GRACE_SECS="2"),
        name="hot",
    ).wait_ready()


def test_rename_into_place_is_served_at_once(server, source, library, own):
    name = own.name()
    hidden = source / f".{name}.tmp"
    copy_adapter(library / "alpha", hidden)  # hidden: ignored
    holds(lambda: (name in server.adapters(), server.error_of(name)),
          lambda seen: not seen[0] and seen[1] is not None, seconds=0.5,
          what="a hidden folder ignored")
    start = time.monotonic()
    hidden.rename(own.path())
    took = server.wait_for(lambda: server.error_of(name) is None, timeout=10,
                           what=f"{name} served")
    assert took < 2.0, f"took {took:.2f} s with a 120 s interval: events did not drive it"
    assert time.monotonic() - start < 3
    assert server.complete(name) == server.complete("alpha")


def test_slow_copy_is_pending_never_failed_then_exact(server, library, own):
    name = own.name()
    seen: list[str] = []
    copier = threading.Thread(
        target=slow_copy, args=(library / "beta", own.path()), kwargs={"seconds": 3}
    )
    copier.start()
    while copier.is_alive():  # a look every 0.1 s while the copy goes on
        error = server.error_of(name)
        if error is not None:  # the service's words (its name holds "failed")
            seen.append(error.replace(name, "<name>"))
        time.sleep(0.1)
    copier.join()
    done = time.monotonic()
    server.wait_for(lambda: server.error_of(name) is None, timeout=10, what=f"{name} served")
    assert time.monotonic() - done < 2.0
    assert seen, "the adapter was never seen mid-copy"
    assert not any("failed" in e for e in seen), seen
    assert any("not ready yet" in e for e in seen), seen
    assert server.complete(name) == server.complete("beta")
    assert server.complete(name, LONG_PROMPT) == server.complete("beta", LONG_PROMPT)


def test_truncated_weights_wait_and_do_not_disturb_others(server, library, own):
    name = own.name()
    folder = own.path()
    folder.mkdir()
    shutil.copy(library / "gamma" / "adapter_config.json", folder)
    data = (library / "gamma" / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])
    server.wait_adapters(lambda adapters: name in adapters
                         and adapters[name]["state"] == "pending"
                         and (adapters[name]["reason"] or "").startswith("incomplete"),
                         timeout=10, only=[name], what=f"{name} pending: incomplete")
    assert "not ready yet: incomplete" in server.error_of(name)
    assert server.complete("alpha")
    (folder / "adapter_model.safetensors").write_bytes(data)
    server.wait_for(lambda: server.error_of(name) is None, timeout=10, what=f"{name} served")
    assert server.complete(name) == server.complete("gamma")


def test_changed_weights_replace_the_old_without_a_gap(server, library, own):
    name = own.add("alpha")
    server.wait_served(name)
    old_long = server.complete(name, LONG_PROMPT)  # its prefix is now cached
    new_long = server.complete("gamma", LONG_PROMPT)
    assert old_long != new_long
    errors: list[Exception] = []
    answers: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            try:
                answers.append(server.complete(name, LONG_PROMPT))
            except Exception as exc:  # any error is a gap in service
                errors.append(exc)

    thread = threading.Thread(target=traffic)
    thread.start()
    server.wait_for(lambda: len(answers) >= 2 or errors, timeout=30, what="traffic under way")
    # Replace the weights in place, as `cp` over an existing folder does.
    shutil.copy(library / "gamma" / "adapter_model.safetensors",
                own.path() / "adapter_model.safetensors")
    # Only the traffic thread sends requests meanwhile (no batching with another request).
    server.wait_for(lambda: answers[-3:] == [new_long] * 3, timeout=15,
                    what="new weights served")
    stop.set()
    thread.join()
    assert not errors, errors[:3]
    switch = answers.index(new_long)
    assert set(answers[:switch]) == {old_long}, answers
    assert set(answers[switch:]) == {new_long}, answers
    # Exactly the new weights' answers, also for the prompt whose prefix was cached before.
    assert server.complete(name, LONG_PROMPT) == new_long
    assert server.complete(name) == server.complete("gamma")


def test_an_updated_adapter_is_not_read_again_while_it_generates(server, library, own):
    """After an update, the backend serves the new weights from memory, as it does a freshly
    loaded adapter: none of its files is opened again while it generates (vLLM's
    `load_inplace` kept the flag and re-read both files at every decode step)."""
    updated, fresh = own.add("alpha", "updated"), own.add("gamma", "fresh")
    server.wait_served(updated)
    server.wait_served(fresh)
    before = server.adapters()[updated]["version"]
    shutil.copy(library / "gamma" / "adapter_model.safetensors",
                own.path("updated") / "adapter_model.safetensors")
    server.wait_adapters(lambda adapters: adapters[updated]["version"] != before
                         and adapters[updated]["served_version"] == adapters[updated]["version"],
                         timeout=15, only=[updated], what=f"{updated} updated")
    assert server.complete(updated) == server.complete(fresh)  # the same weights now

    def opens_while_generating(name: str) -> int:
        folders = [p for p in server.cache.glob("snapshots/*/*") if p.is_dir()]
        with OpenCounter(folders) as counter:
            for _ in range(3):
                for chunk in server.openai.completions.create(
                        model=name, prompt=LONG_PROMPT, max_tokens=16, temperature=0,
                        stream=True):
                    assert chunk.choices
            return sum(counter.count().values())

    assert opens_while_generating(fresh) == 0
    assert opens_while_generating(updated) == 0


def test_folder_deleted_right_after_it_appears(server, own):
    name = own.name()
    for _ in range(3):
        own.add("beta")
        time.sleep(0.02)  # part of the scenario: there for an instant only
        shutil.rmtree(own.path())
    server.wait_unlisted([name], timeout=10, stable=1.0)
    assert "does not exist" in server.error_of(name)
    assert name not in server.models()
    assert server.complete("beta")


def test_snapshots_follow_what_is_served(server, own):
    versions = {"1": "alpha", "2": "gamma"}
    removed = [own.add(origin, suffix) for suffix, origin in versions.items()]
    for name in removed:
        server.wait_served(name)
    for suffix in versions:
        shutil.rmtree(own.path(suffix))
    server.wait_for(lambda: removed[-1] not in server.models(), timeout=10,
                    what=f"{removed[-1]} removed")
    served = {m for m in server.models() if m != "tiny"}
    # kept for NIM_SNAPSHOT_GRACE_SECS after the unload: vLLM may still read them
    assert removed[-1] in {name.rsplit("-", 1)[0] for name in server.snapshots()}

    def only_served() -> bool:
        names = server.snapshots()
        return {n.rsplit("-", 1)[0] for n in names} == served and len(names) == len(served)

    server.wait_for(only_served, timeout=10, what="unserved snapshots deleted")


def test_source_folder_edits_never_corrupt_what_is_served(server, own):
    name = own.add("beta")
    server.wait_served(name)
    answer = server.complete(name, LONG_PROMPT)
    weights = own.path() / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # someone truncates the source in place
    # seen by the service (new files, not served) while the served version serves on
    server.wait_adapters(lambda adapters: adapters[name]["version"]
                         != adapters[name]["served_version"], timeout=10, only=[name],
                         what=f"{name}'s truncated files seen")
    assert server.complete(name, LONG_PROMPT) == answer  # still the snapshot's weights
    weights.write_bytes(data)


def test_jsonl_logs_carry_request_fields(server):
    server.complete("beta")
    entries = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    ours = [e for e in entries if e["logger"].startswith("entrypoint")]
    assert any(e["logger"].startswith("entrypoint.reconcile") and "loaded" in e["message"]
               for e in ours)
    requests = [e for e in ours if e["logger"] == "entrypoint.access"]
    last = requests[-1]
    assert (last["model"], last["adapter"], last["status"]) == ("beta", "beta", 200)
    assert last["duration_ms"] > 0 and last["path"] == "/v1/completions"
    assert any(e["logger"] == "backend" for e in entries)  # vLLM's lines, wrapped
