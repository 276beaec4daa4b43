"""Profiles: declarative files in `profiles/` that say which backend runs how, and selection.

Reads YAML into `Profile` objects and picks one by name, id or fit. Starts nothing and talks to no
backend; hardware detection feeds it plain data.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from .settings import ConfigError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "profiles"


class Hardware(BaseModel):
    """What a profile needs to run."""

    device: Literal["cpu", "gpu"] = "gpu"
    gpu_count: int = 0
    min_gpu_memory_gib: float = 0


class Profile(BaseModel):
    """One way to run the backend: a profile file's content plus its stable id."""

    name: str
    backend: Literal["vllm", "sglang"]
    precision: str
    tp: int = 1
    pp: int = 1
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


def load_profiles(*folders: Path) -> list[Profile]:
    """Every `*.yaml` profile in the folders (the built-in one first when none is given)."""
    folders = folders or (BUILTIN_DIR,)
    profiles: dict[str, Profile] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.y*ml")):
            try:
                data = yaml.safe_load(path.read_text())
                profile = Profile.model_validate({**(data or {}), "source": str(path)})
            except (yaml.YAMLError, ValidationError, TypeError) as exc:
                first = str(exc).splitlines()[0]
                raise ConfigError(f"profile file {path} is not a valid profile: {first}") from None
            profiles[profile.name] = profile
    return list(profiles.values())


def find_profile(profiles: list[Profile], wanted: str) -> Profile:
    """The profile whose name or id is `wanted`; a `ConfigError` listing the names otherwise."""
    for profile in profiles:
        if wanted in (profile.name, profile.id):
            return profile
    names = ", ".join(sorted(p.name for p in profiles)) or "(none found)"
    raise ConfigError(f"NIM_MODEL_PROFILE={wanted}: no such profile; known profiles: {names}")


def select_profile(
    profiles: list[Profile], *, wanted: str | None, lora: bool, gpu_count: int = 0
) -> Profile:
    """The requested profile, or the first that fits the hardware (LoRA ones when `lora`)."""
    if wanted:
        return find_profile(profiles, wanted)
    fitting = [
        p
        for p in profiles
        if (p.lora or not lora)
        and (
            (p.hardware.device == "cpu" and gpu_count == 0)
            or (p.hardware.device == "gpu" and 0 < p.tp * p.pp <= gpu_count)
        )
    ]
    if not fitting:
        kind = "LoRA " if lora else ""
        raise ConfigError(
            f"NIM_MODEL_PROFILE is unset and no {kind}profile fits this machine "
            f"({gpu_count} GPUs); set NIM_MODEL_PROFILE to one of: "
            + ", ".join(sorted(p.name for p in profiles))
        )
    return fitting[0]
