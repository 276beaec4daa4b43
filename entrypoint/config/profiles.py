"""Profiles: declarative files that say which backend runs how, and the choice among them.

Reads YAML into `Profile` objects, judges each against the detected GPUs and the model's size,
and picks one by name, id or NIM's order. Starts nothing and talks to no backend.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from entrypoint.config.hardware import GPU
from entrypoint.config.settings import ConfigError

#: the built-in profile files: package data, found wherever the package is installed
BUILTIN_PROFILES = "builtin_profiles"
BACKEND_ORDER = ("vllm", "sglang")  # NIM's order, without TensorRT-LLM
PRECISION_ORDER = ("fp8", "bf16")  # lower precision first
BYTES_PER_PARAM = {"fp8": 1.0, "bf16": 2.0, "fp16": 2.0, "fp32": 4.0}
MEMORY_HEADROOM = 0.85  # weights may take this share of a GPU; the rest is KV cache and runtime
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
               "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


class Hardware(BaseModel):
    """What a profile needs to run."""

    model_config = ConfigDict(extra="forbid")

    device: Literal["cpu", "gpu"] = "gpu"
    min_gpu_memory_gib: float = 0
    min_compute_capability: float = 0
    #: substrings of GPU names this profile is tuned for (e.g. "H100"); empty: any GPU
    gpu_models: list[str] = Field(default_factory=list)


class Profile(BaseModel):
    """One way to run the backend: a profile file's content plus its stable id."""

    model_config = ConfigDict(extra="forbid")

    name: str
    backend: Literal["vllm", "sglang"]
    precision: Literal["bf16", "fp16", "fp8", "fp32"]
    tp: int = Field(default=1, ge=1)
    pp: int = Field(default=1, ge=1)
    lora: bool = False
    hardware: Hardware = Field(default_factory=Hardware)
    backend_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    source: str = Field(default="", exclude=True)

    @property
    def id(self) -> str:
        """A 64-hex hash of the profile's content (not of its file name or location)."""
        canonical = json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def gpus_needed(self) -> int:
        return self.tp * self.pp if self.hardware.device == "gpu" else 0


def _profile_files(folder: Traversable) -> list[Traversable]:
    return sorted((f for f in folder.iterdir() if f.name.endswith((".yaml", ".yml"))),
                  key=lambda f: f.name)


def load_profiles(*folders: Path) -> list[Profile]:
    """Every `*.yaml` profile: the built-in ones, then each extra folder's (same name: replaced)."""
    profiles: dict[str, Profile] = {}
    builtin = resources.files(__package__ or "entrypoint").joinpath(BUILTIN_PROFILES)
    for folder in (builtin, *folders):
        if not folder.is_dir():
            if folder is builtin:
                raise ConfigError(f"the built-in profiles ({folder}) are missing from the "
                                  "installed package; reinstall lora-entrypoint")
            raise ConfigError(f"NIM_PROFILES_PATH={folder}: no such folder; mount your profile "
                              "files there or unset it")
        for path in _profile_files(folder):
            try:
                data = yaml.safe_load(path.read_text())
                profile = Profile.model_validate({**(data or {}), "source": str(path)})
            except (yaml.YAMLError, ValidationError, TypeError, OSError) as exc:
                first = " ".join(str(exc).split())[:300]
                raise ConfigError(f"profile file {path} is not a valid profile: {first}") from None
            profiles[profile.name] = profile
    return list(profiles.values())


def model_parameters(model: str | None) -> int | None:
    """The number of parameters in a local model folder, from its safetensors headers."""
    if not model:
        return None
    folder = Path(model).expanduser()
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    total = 0
    for path in files:
        try:
            with path.open("rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(length))
        except (OSError, ValueError, struct.error):
            return None
        for key, info in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in info.get("shape", []):
                count *= int(dim)
            total += count
    return total


@dataclass(frozen=True)
class Assessment:
    """A profile judged against this machine and model."""

    profile: Profile
    compatible: bool
    reason: str = ""  # why not compatible
    low_memory: str = ""  # compatible, but the model may not fit: a hint
    gpu_match: bool = False  # names the detected GPU model
    selected: bool = False

    @property
    def runnable(self) -> bool:
        return self.compatible and not self.low_memory

    def describe(self) -> dict:
        p = self.profile
        return {
            "id": p.id, "name": p.name, "backend": p.backend, "precision": p.precision,
            "tp": p.tp, "pp": p.pp, "lora": p.lora, "compatible": self.compatible,
            "low_memory": bool(self.low_memory), "reason": self.reason or self.low_memory or None,
            "selected": self.selected,
        }


def assess(profile: Profile, gpus: list[GPU], *, params: int | None = None) -> Assessment:
    """Can this profile run here, and does the model fit?"""
    hw = profile.hardware
    if hw.device == "cpu":
        if gpus:
            return Assessment(profile, False, "a CPU profile; this machine has GPUs")
        return Assessment(profile, True)
    if not gpus:
        return Assessment(profile, False, f"needs {profile.gpus_needed} GPU(s); none found")
    if len(gpus) < profile.gpus_needed:
        return Assessment(profile, False, f"needs {profile.gpus_needed} GPUs (tp {profile.tp} x "
                          f"pp {profile.pp}); {len(gpus)} found")
    used = gpus[: profile.gpus_needed]
    weakest = min(used, key=lambda g: (g.compute_capability, g.memory_mib))
    if weakest.compute_capability < hw.min_compute_capability:
        return Assessment(profile, False, f"{profile.precision} needs compute capability "
                          f"{hw.min_compute_capability}+; {weakest.name} has "
                          f"{weakest.compute_capability}")
    smallest = min(g.memory_gib for g in used)
    if smallest < hw.min_gpu_memory_gib:
        return Assessment(profile, False, f"needs {hw.min_gpu_memory_gib:g} GiB per GPU; "
                          f"{smallest:.0f} GiB found")
    match = any(model.lower() in g.name.lower() for model in hw.gpu_models for g in used)
    if hw.gpu_models and not match:
        return Assessment(profile, False, f"built for {', '.join(hw.gpu_models)}; found "
                          f"{used[0].name}")
    hint = ""
    if params is not None:
        need = params * BYTES_PER_PARAM.get(profile.precision, 2.0) / profile.gpus_needed / 2**30
        if need > smallest * MEMORY_HEADROOM:
            hint = (f"the model's weights need about {need:.1f} GiB per GPU and the GPUs have "
                    f"{smallest:.0f} GiB: use a profile with a larger tp or fp8, or more GPUs")
    return Assessment(profile, True, low_memory=hint, gpu_match=match)


def _preference(a: Assessment, lora: bool) -> tuple:
    p = a.profile
    return (
        p.lora != lora,  # LoRA profiles only when adapters are served; plain ones otherwise
        not a.gpu_match,  # a profile tuned for the GPU model first
        BACKEND_ORDER.index(p.backend),
        PRECISION_ORDER.index(p.precision) if p.precision in PRECISION_ORDER else 9,
        -p.gpus_needed,  # the largest tp the GPUs allow
        p.name,
    )


def assess_all(
    profiles: list[Profile], gpus: list[GPU], *, lora: bool, params: int | None = None,
    wanted: str | None = None,
) -> list[Assessment]:
    """Every profile judged, with the one that would be chosen marked `selected`."""
    judged = [assess(p, gpus, params=params) for p in profiles]
    chosen = None
    if wanted:
        chosen = next((a for a in judged if wanted in (a.profile.name, a.profile.id)), None)
    else:
        candidates = [a for a in judged if a.runnable and (a.profile.lora or not lora)]
        if candidates:
            chosen = min(candidates, key=lambda a: _preference(a, lora))
    out = [Assessment(a.profile, a.compatible, a.reason, a.low_memory, a.gpu_match,
                      a is chosen) for a in judged]
    return sorted(out, key=lambda a: (not a.compatible, bool(a.low_memory), _preference(a, lora)))


def find_profile(profiles: list[Profile], wanted: str) -> Profile:
    """The profile whose name or id is `wanted`; a `ConfigError` listing the names otherwise."""
    for profile in profiles:
        if wanted in (profile.name, profile.id):
            return profile
    names = ", ".join(sorted(p.name for p in profiles)) or "(none found)"
    raise ConfigError(f"NIM_MODEL_PROFILE={wanted}: no such profile; known profiles: {names}")


def select_profile(
    profiles: list[Profile],
    gpus: list[GPU],
    *,
    wanted: str | None,
    lora: bool,
    params: int | None = None,
    allow_incompatible: bool = False,
) -> tuple[Profile, list[tuple[int, str]]]:
    """The requested profile (checked against the hardware), or the best that fits.

    Returns the profile and what to tell the operator about the choice (log level, message).
    Logs nothing itself, so that a configuration error is the only line a failed start prints.
    """
    if wanted:
        profile = find_profile(profiles, wanted)
        verdict = assess(profile, gpus, params=params)
        if not verdict.compatible:
            message = (f"NIM_MODEL_PROFILE={wanted}: not compatible with this machine: "
                       f"{verdict.reason}; run `lora-entrypoint list-model-profiles` to see the "
                       "compatible ones")
            if not allow_incompatible:
                raise ConfigError(message)
            return profile, [(logging.WARNING, f"{message} (dry run: showing it anyway)")]
        if verdict.low_memory:
            return profile, [(logging.WARNING, f"profile {profile.name}: {verdict.low_memory}")]
        return profile, []
    judged = assess_all(profiles, gpus, lora=lora, params=params)
    chosen = next((a for a in judged if a.selected), None)
    if chosen is None:
        kind = "LoRA " if lora else ""
        found = f"{len(gpus)} GPU(s)" if gpus else "no GPU"
        raise ConfigError(
            f"NIM_MODEL_PROFILE is unset and no {kind}profile fits this machine ({found}); run "
            "`lora-entrypoint list-model-profiles` and set NIM_MODEL_PROFILE"
        )
    runnable = [a.profile.name for a in judged if a.runnable and (a.profile.lora or not lora)]
    return chosen.profile, [(logging.INFO, f"compatible profiles: {', '.join(runnable)}")]
