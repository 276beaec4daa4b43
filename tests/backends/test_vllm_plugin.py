"""The vLLM plugin on its own: AMX permission as the CPU allows, base rows left alone."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from entrypoint.backends import vllm_plugin


def test_amx_permission_matches_what_this_cpu_has():
    # In a fresh process: the answer must not depend on an earlier request in this one.
    code = "from entrypoint.backends.vllm_plugin import request_amx_permission as r; print(r())"
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    has_amx = "amx_tile" in Path("/proc/cpuinfo").read_text()
    if has_amx:
        assert answer == "granted"
    else:
        assert answer.startswith("not needed"), answer
    print(f"this CPU {'has' if has_amx else 'has no'} AMX: {answer}")


def test_registered_as_a_vllm_general_plugin():
    from importlib.metadata import entry_points

    (plugin,) = [e for e in entry_points(group="vllm.general_plugins")
                 if e.name == vllm_plugin.PLUGIN_NAME]
    assert plugin.load() is vllm_plugin.register


@pytest.fixture
def lora_ops():
    """vLLM's torch LoRA ops, guarded, and restored afterwards."""
    modules = [importlib.import_module(name) for name in vllm_plugin.OP_MODULES]
    saved = [{name: getattr(m, name) for name, _ in vllm_plugin.SLOT_OPS} for m in modules]
    assert vllm_plugin.guard_cpu_lora_ops() in ("applied", "already applied")
    assert vllm_plugin.guard_cpu_lora_ops() == "already applied"  # safe to run twice
    yield modules[0]
    for module, ops in zip(modules, saved, strict=True):
        for name, op in ops.items():
            setattr(module, name, op)


def test_tokens_without_an_adapter_get_nothing_from_the_last_slot(lora_ops):
    import torch  # here: collecting the unit tests should not import torch in every process

    torch.manual_seed(0)
    slots, rank, width = 3, 4, 8
    lora_a = torch.randn(slots, 1, rank, width)
    lora_b = torch.randn(slots, 1, width, rank)
    x = torch.randn(4, width)
    indices = torch.tensor([0, -1, 2, -1])  # tokens 1 and 3 are the base model's
    buffer = torch.zeros(4, rank)
    lora_ops.sgmv_shrink(x, lora_a, buffer, torch.tensor([0, 1, 2, 3]), torch.ones(4,
                         dtype=torch.long), indices, 4, 1, 4, 1.0)
    y = torch.zeros(4, width)
    lora_ops.bgmv_expand(buffer, lora_b, y, indices, add_inputs=True)
    assert torch.all(y[1] == 0) and torch.all(y[3] == 0)  # base rows untouched
    assert torch.allclose(y[0], lora_b[0, 0] @ (lora_a[0, 0] @ x[0]), atol=1e-4)
    assert torch.allclose(y[2], lora_b[2, 0] @ (lora_a[2, 0] @ x[2]), atol=1e-4)
    z = torch.full((4, width * 2), 7.0)
    lora_ops.bgmv_expand_slice(buffer, lora_b, z, indices, width, width, add_inputs=True)
    assert torch.all(z[1] == 7.0) and torch.all(z[3] == 7.0)
