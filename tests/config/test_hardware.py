import pytest

from entrypoint.config.hardware import GPU, detect_gpus, parse_smi, visible
from tests.conftest import INVENTORIES, smi_rows


def test_parse_nvidia_smi_csv():
    gpus = parse_smi(smi_rows(INVENTORIES["2xH100"]) + "garbage line\n")
    assert [(g.index, g.name, g.memory_mib, g.compute_capability) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3", 81559, 9.0), (1, "NVIDIA H100 80GB HBM3", 81559, 9.0)]
    assert round(gpus[0].memory_gib) == 80


@pytest.mark.parametrize(("value", "expected"), [
    (None, [0, 1, 2, 3]), ("", []), ("2", [2]), ("3,1", [3, 1]), ("GPU-0001-fake", [1]),
    ("1,7,2", [1]),  # CUDA stops at the first invalid entry
    ("-1", []),
])
def test_cuda_visible_devices(value, expected):
    gpus = [GPU(i, "G", 1024, 9.0, f"GPU-{i:04d}-fake") for i in range(4)]
    assert [g.index for g in visible(gpus, value)] == expected


def test_detect_through_nvidia_smi(fake_gpus):
    env = fake_gpus("8xA100")
    assert len(detect_gpus(env)) == 8
    assert [g.index for g in detect_gpus({**env, "CUDA_VISIBLE_DEVICES": "4,5"})] == [4, 5]


def test_no_gpu_tools_means_no_gpus(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi; NVML has no driver here
    assert detect_gpus({}) == []
