"""PID-1 duties of the entrypoint, tested directly: started as a session leader (as in a
container), it adopts and reaps orphaned descendants and forwards SIGTERM to the backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.server import children_of, make_source, sglang_env, wait_gone

pytestmark = pytest.mark.e2e


def test_orphans_are_adopted_and_reaped_and_sigterm_is_forwarded(
    serve_factory, tmp_path, tiny_model, library
):
    source = make_source(tmp_path, library, {"alpha": "alpha"})
    env = sglang_env(tmp_path, tiny_model, source, NIM_PEFT_REFRESH_INTERVAL="30",
                     SGLANG_FAKE_ORPHAN_SECS="2")
    server = serve_factory(env, name="pid1").wait_ready(timeout=60)
    pid = server.process.pid
    # The backend's helper outlived its parent: it was reparented to the entrypoint...
    adopted = [p for p in children_of(pid) if "sleep" in Path(f"/proc/{p}/cmdline").read_text()]
    assert adopted, children_of(pid)
    # ...and once it exits, the entrypoint reaps it: no zombie is left behind.
    server.wait_for(lambda: not [p for p, s in children_of(pid).items() if s == "Z"]
                    and not any(p in children_of(pid) for p in adopted), timeout=10,
                    what="orphan reaped")
    assert server.complete("alpha")
    backend = [p for p in children_of(pid)]
    assert server.terminate(timeout=30) == 0
    assert "[fake sglang] graceful shutdown" in server.logs()  # SIGTERM reached the backend
    wait_gone(backend, reaped=True)  # not even a zombie is left
