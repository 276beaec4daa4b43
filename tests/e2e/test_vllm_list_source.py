"""A list file as NIM_PEFT_SOURCE on the real vLLM: a folder entry and an hf:// entry from the
Hub-compatible server of the tests answer as the same adapters served from a folder; a new
commit on the followed branch is swapped in; an entry removed is unloaded."""

from __future__ import annotations

import pytest

from tests.e2e.server import make_source, tiny_env

pytestmark = pytest.mark.e2e


def write(file, entries: dict[str, str]) -> None:
    file.write_text("adapters:\n" + "".join(f"  - name: {name}\n    uri: {uri}\n"
                                            for name, uri in entries.items()))


def test_folder_and_hub_entries_answer_as_from_a_folder(serve_factory, tiny_model, library,
                                                        hub_server, tmp_path):
    hub_server.commit("acme/pirate", library / "alpha")
    plain = make_source(tmp_path, library, {"alpha": "alpha", "beta": "beta"})
    listed = tmp_path / "etc" / "adapters.yaml"
    listed.parent.mkdir()
    write(listed, {"from-folder": str(plain / "beta"), "from-hub": "hf://acme/pirate"})
    server = serve_factory(tiny_env(tiny_model, listed, NIM_PEFT_REFRESH_INTERVAL="1",
                                    NIM_MAX_LORA_RANK="16", NIM_CACHE_PATH=str(tmp_path / "c"),
                                    **hub_server.env()), name="list").wait_ready()
    reference = serve_factory(tiny_env(tiny_model, plain, NIM_MAX_LORA_RANK="16",
                                       NIM_CACHE_PATH=str(tmp_path / "r")),
                              name="plain").wait_ready()
    server.wait_for(lambda: server.error_of("from-hub") is None and
                    server.error_of("from-folder") is None, timeout=60, what="both served")
    assert server.complete("from-hub") == reference.complete("alpha")
    assert server.complete("from-folder") == reference.complete("beta")
    assert server.adapters()["from-hub"]["source"].startswith("hf://acme/pirate@")
    hub_server.commit("acme/pirate", library / "beta")  # the branch moves on
    server.wait_for(lambda: server.complete("from-hub") == reference.complete("beta"),
                    timeout=60, what="the new commit served")
    write(listed, {"from-hub": "hf://acme/pirate"})
    server.wait_for(lambda: server.error_of("from-folder") is not None, timeout=30,
                    what="the removed entry unloaded")
    assert "from-folder" not in server.models()
