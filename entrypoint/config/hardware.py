"""Hardware: the GPUs this process may use, as plain data.

NVML first (`nvidia-ml-py`), then `nvidia-smi --query-gpu`, filtered by CUDA_VISIBLE_DEVICES.
No GPU found means only CPU profiles fit. Reads the machine only; selection lives in `profiles`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass

log = logging.getLogger(__name__)

SMI_FIELDS = "index,uuid,name,memory.total,compute_cap"


@dataclass(frozen=True)
class GPU:
    index: int
    name: str
    memory_mib: int
    compute_capability: float
    uuid: str = ""

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024

    def describe(self) -> dict:
        return {**asdict(self), "memory_gib": round(self.memory_gib, 1)}


def _from_nvml() -> list[GPU] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver / library: fall back to nvidia-smi
        return None
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(GPU(
                index=index,
                name=name.decode() if isinstance(name, bytes) else name,
                memory_mib=memory // (1 << 20),
                compute_capability=float(f"{major}.{minor}"),
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
            ))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def parse_smi(text: str) -> list[GPU]:
    """GPUs from `nvidia-smi --query-gpu=index,uuid,name,memory.total,compute_cap` CSV."""
    gpus = []
    for row in csv.reader(io.StringIO(text)):
        cells = [cell.strip() for cell in row]
        if len(cells) < 5 or not cells[0].isdigit():
            continue
        try:
            capability = float(cells[4])
        except ValueError:
            capability = 0.0
        gpus.append(GPU(index=int(cells[0]), uuid=cells[1], name=cells[2],
                        memory_mib=int(float(cells[3])), compute_capability=capability))
    return gpus


def _from_smi() -> list[GPU] | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run(
            [smi, f"--query-gpu={SMI_FIELDS}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("nvidia-smi failed (%s); assuming no GPU", exc)
        return None
    if result.returncode != 0:
        log.warning("nvidia-smi exited %d; assuming no GPU", result.returncode)
        return None
    return parse_smi(result.stdout)


def visible(gpus: list[GPU], cuda_visible_devices: str | None) -> list[GPU]:
    """The GPUs CUDA_VISIBLE_DEVICES lets this process use (by index or UUID), in its order."""
    if cuda_visible_devices is None:
        return gpus
    wanted = [part.strip() for part in cuda_visible_devices.split(",") if part.strip()]
    chosen = []
    for item in wanted:
        match = next((g for g in gpus if str(g.index) == item or g.uuid == item
                      or (item.startswith("GPU-") and g.uuid.startswith(item))), None)
        if match is None:
            break  # CUDA stops at the first invalid entry
        chosen.append(match)
    return chosen


def detect_gpus(environ: Mapping[str, str] | None = None) -> list[GPU]:
    """The GPUs this process may use; [] without any."""
    environ = os.environ if environ is None else environ
    gpus = _from_nvml()
    if gpus is None:
        gpus = _from_smi() or []
    return visible(gpus, environ.get("CUDA_VISIBLE_DEVICES"))
