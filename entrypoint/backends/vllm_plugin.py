"""vLLM plugin: run by vLLM itself in each of its processes (API server, engine core, workers).

Registered as the `vllm.general_plugins` entry point `lora_entrypoint`; the launch plan keeps it
enabled when `VLLM_PLUGINS` narrows vLLM's plugins. It fixes two defects of vLLM's CPU build that
no flag reaches (docs/architecture.md, "Inside vLLM"). It must stay cheap, must be safe to run
twice, and never raises: it reports what it did in one log line per process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

PLUGIN_NAME = "lora_entrypoint"
log = logging.getLogger("vllm.lora_entrypoint")

# Linux x86-64: arch_prctl(2) and the extended-state feature that holds AMX tile data.
SYS_ARCH_PRCTL = 158
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def request_amx_permission() -> str:
    """Ask Linux for permission to use AMX tiles in this process; say what came of it.

    vLLM's CPU attention uses AMX instructions on CPUs that have them, but only oneDNN asks the
    kernel for the permission they need, and only when it first uses AMX itself; without it the
    first AMX instruction is SIGILL. The permission is per process and cleared by exec, so it is
    asked for here, in every vLLM process. Returns "granted", or why not ("no AMX", ...).
    """
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "not needed (not x86-64 Linux)"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0:
            errno = ctypes.get_errno()
            if errno == 95:  # EOPNOTSUPP: this CPU has no AMX tile data
                return "not needed (no AMX)"
            if errno == 22:  # EINVAL: a kernel older than 5.16, which does not enable AMX
                return "not needed (kernel without AMX support)"
            return f"refused ({os.strerror(errno)})"
        mask = ctypes.c_ulong(0)
        libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask))
        return "granted" if mask.value >> XFEATURE_XTILEDATA & 1 else "not granted"
    except (OSError, AttributeError) as exc:
        return f"unknown ({exc})"


def _leave_base_rows(op: Callable[..., Any], index_arg: int) -> Callable[..., Any]:
    """`op` with the rows of tokens without an adapter (slot index -1) left as they were.

    That is what vLLM's GPU kernels do. Its CPU ops index the slot stack with -1 instead, which
    torch reads as the last slot, so base-model tokens batched with adapter tokens got the last
    slot's adapter once every slot was in use.
    """
    if getattr(op, "_leaves_base_rows", False):
        return op

    def guarded(*args: Any, **kwargs: Any) -> Any:
        indices = args[index_arg]
        output = args[2]
        rows = min(indices.shape[0], output.shape[0])
        base = indices[:rows] < 0
        if not bool(base.any()):
            return op(*args, **kwargs)
        kept = output[:rows][base].clone()
        result = op(*args, **kwargs)
        output[:rows][base] = kept
        return result

    guarded.__name__ = getattr(op, "__name__", "op")
    guarded.__doc__ = op.__doc__
    guarded._leaves_base_rows = True  # type: ignore[attr-defined]
    return guarded


# The CPU ops that index the slot stack per token: (name, position of the index argument).
# The `sgmv_*` ops expand their indices per token and call these.
SLOT_OPS = (("bgmv_shrink", 3), ("bgmv_expand", 3), ("bgmv_expand_slice", 3))
OP_MODULES = ("vllm.lora.ops.torch_ops.lora_ops", "vllm.lora.ops.torch_ops",
              "vllm.lora.punica_wrapper.punica_cpu")


def guard_cpu_lora_ops() -> str:
    """Make vLLM's torch LoRA ops leave base-model rows alone. Returns what was done."""
    import importlib

    patched = 0
    for module_name in OP_MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # an older or newer vLLM: say so, go on
            return f"not applied ({module_name}: {type(exc).__name__})"
        for name, index_arg in SLOT_OPS:
            op = getattr(module, name, None)
            if op is None:
                return f"not applied ({module_name} has no {name})"
            guarded = _leave_base_rows(op, index_arg)
            if guarded is not op:
                setattr(module, name, guarded)
                patched += 1
    return "applied" if patched else "already applied"


def register() -> None:
    """The entry point vLLM calls in each process."""
    try:
        amx = request_amx_permission()
        slots = guard_cpu_lora_ops()
    except Exception as exc:  # never take vLLM down from here
        log.warning("lora-entrypoint plugin failed in pid %d: %s", os.getpid(), exc)
        return
    log.info("lora-entrypoint plugin in pid %d: AMX tile permission %s; base-slot guard for "
             "CPU LoRA ops %s", os.getpid(), amx, slots)
