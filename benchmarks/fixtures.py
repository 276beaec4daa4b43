"""Synthetic adapter folders for scale benchmarks and tests: valid PEFT layout, tiny tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save

CONFIG = {
    "peft_type": "LORA", "r": 8, "lora_alpha": 16, "bias": "none",
    "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM",
}


def make_synthetic_adapters(root: Path, count: int, *, prefix: str = "a") -> list[Path]:
    """`count` valid adapter folders under `root` (config + a small safetensors file each)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    weights = save({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
            rng.standard_normal((8, 16), dtype=np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight":
            rng.standard_normal((16, 8), dtype=np.float32),
    })
    config = json.dumps(CONFIG).encode()
    folders = []
    for i in range(count):
        folder = root / f"{prefix}{i:05d}"
        folder.mkdir(exist_ok=True)
        (folder / "adapter_config.json").write_bytes(config)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        folders.append(folder)
    return folders


def machine() -> dict:
    """What a result was measured on."""
    import platform

    return {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()}


def save_result(result: dict, out: Path) -> None:
    """Write `result` to `out` as JSON and print it."""
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))

