import json
import struct
from pathlib import Path

import pytest

from entrypoint.config.hardware import parse_smi
from entrypoint.config.profiles import (
    assess_all,
    find_profile,
    load_profiles,
    model_parameters,
    select_profile,
)
from entrypoint.config.settings import ConfigError
from tests.conftest import INVENTORIES, smi_rows


def gpus(name: str):
    return parse_smi(smi_rows(INVENTORIES[name]))


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def test_the_set_covers_backends_precisions_tp_and_lora(profiles):
    names = {p.name for p in profiles}
    for backend in ("vllm", "sglang"):
        for precision in ("bf16", "fp8"):
            for tp in (1, 2, 4, 8):
                assert f"{backend}-{precision}-tp{tp}-pp1" in names
                assert f"{backend}-{precision}-tp{tp}-pp1-feat_lora" in names
    assert "vllm-cpu-bf16-tp1-pp1-feat_lora" in names


def test_ids_are_stable_hashes_of_content(profiles, tmp_path):
    profile = find_profile(profiles, "vllm-bf16-tp2-pp1-feat_lora")
    assert len(profile.id) == 64 and int(profile.id, 16) >= 0
    copy = tmp_path / "elsewhere.yaml"  # another file name and folder: the same id
    copy.write_text(Path(profile.source).read_text())
    assert {p.id for p in load_profiles(tmp_path) if p.name == profile.name} == {profile.id}
    assert len({p.id for p in profiles}) == len(profiles)


EXPECTED = {
    # inventory: (selected with LoRA, selected without)
    "none": ("vllm-cpu-bf16-tp1-pp1-feat_lora", "vllm-cpu-bf16-tp1-pp1"),
    "1xH100": ("vllm-fp8-tp1-pp1-feat_lora", "vllm-fp8-tp1-pp1"),
    "2xH100": ("vllm-fp8-tp2-pp1-feat_lora", "vllm-fp8-tp2-pp1"),
    "8xA100": ("vllm-bf16-tp8-pp1-feat_lora", "vllm-bf16-tp8-pp1"),
    "1xL4": ("vllm-fp8-tp1-pp1-feat_lora", "vllm-fp8-tp1-pp1"),
}


@pytest.mark.parametrize("inventory", EXPECTED)
def test_automatic_selection(profiles, inventory):
    with_lora, without = EXPECTED[inventory]
    assert select_profile(profiles, gpus(inventory), wanted=None, lora=True)[0].name == with_lora
    assert select_profile(profiles, gpus(inventory), wanted=None, lora=False)[0].name == without


def test_listing_groups_on_two_h100(profiles):
    judged = {a.profile.name: a for a in assess_all(profiles, gpus("2xH100"), lora=True)}
    assert [n for n, a in judged.items() if a.selected] == ["vllm-fp8-tp2-pp1-feat_lora"]
    assert judged["sglang-bf16-tp1-pp1-feat_lora"].runnable
    assert judged["vllm-bf16-tp4-pp1"].reason == "needs 4 GPUs (tp 4 x pp 1); 2 found"
    assert judged["vllm-cpu-bf16-tp1-pp1"].reason == "a CPU profile; this machine has GPUs"
    first = next(iter(judged))
    assert first == "vllm-fp8-tp2-pp1-feat_lora"  # listed in order of preference


def test_fp8_needs_ada_or_hopper(profiles):
    judged = {a.profile.name: a for a in assess_all(profiles, gpus("8xA100"), lora=True)}
    assert not judged["vllm-fp8-tp8-pp1-feat_lora"].compatible
    assert "compute capability 8.9+" in judged["vllm-fp8-tp8-pp1-feat_lora"].reason


def test_no_gpu_only_cpu_profiles(profiles):
    judged = assess_all(profiles, [], lora=True)
    assert {a.profile.name for a in judged if a.compatible} == {
        "vllm-cpu-bf16-tp1-pp1", "vllm-cpu-bf16-tp1-pp1-feat_lora"}


@pytest.fixture
def big_model(tmp_path) -> Path:
    """A model folder whose safetensors header declares 80 billion parameters (header only)."""
    folder = tmp_path / "llama-80b"
    folder.mkdir()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [80_000_000, 1000],
                               "data_offsets": [0, 0]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return folder


def test_memory_check_puts_too_small_profiles_in_low_memory(profiles, big_model):
    params = model_parameters(str(big_model))
    assert params == 80_000_000_000
    judged = {a.profile.name: a for a in assess_all(profiles, gpus("8xA100"), lora=True,
                                                    params=params)}
    assert judged["vllm-bf16-tp4-pp1-feat_lora"].low_memory.startswith(
        "the model's weights need about 37.3 GiB per GPU and the GPUs have 40 GiB")
    assert judged["vllm-bf16-tp8-pp1-feat_lora"].runnable
    chosen, _ = select_profile(profiles, gpus("8xA100"), wanted=None, lora=True, params=params)
    assert chosen.name == "vllm-bf16-tp8-pp1-feat_lora"
    with pytest.raises(ConfigError, match="no LoRA profile fits this machine"):
        select_profile(profiles, gpus("1xL4"), wanted=None, lora=True, params=params)


def test_requested_profile_by_name_or_id(profiles):
    profile = find_profile(profiles, "sglang-bf16-tp1-pp1-feat_lora")
    by_id, _ = select_profile(profiles, gpus("1xH100"), wanted=profile.id, lora=True)
    assert by_id.name == profile.name


def test_requested_profile_incompatible_says_why(profiles):
    with pytest.raises(ConfigError, match=r"^NIM_MODEL_PROFILE=vllm-bf16-tp8-pp1-feat_lora: not "
                       r"compatible with this machine: needs 8 GPUs \(tp 8 x pp 1\); 2 found"):
        select_profile(profiles, gpus("2xH100"), wanted="vllm-bf16-tp8-pp1-feat_lora",
                       lora=True)
    profile, notes = select_profile(profiles, [], wanted="vllm-bf16-tp8-pp1-feat_lora",
                                    lora=True, allow_incompatible=True)
    assert profile.tp == 8 and "dry run" in notes[0][1]


def test_operator_profiles_from_a_mounted_folder(tmp_path):
    (tmp_path / "h100.yaml").write_text(
        "name: vllm-bf16-tp1-pp1-feat_lora-h100\nbackend: vllm\nprecision: bf16\ntp: 1\n"
        "lora: true\nhardware: {device: gpu, gpu_models: [H100]}\n"
        "backend_args: [--dtype, bfloat16, --enable-prefix-caching]\n")
    profiles = load_profiles(tmp_path)
    # A profile tuned for the detected GPU model wins over the generic order...
    chosen, _ = select_profile(profiles, gpus("1xH100"), wanted=None, lora=True)
    assert chosen.name == "vllm-bf16-tp1-pp1-feat_lora-h100"
    # ...and does not run anywhere else.
    judged = {a.profile.name: a for a in assess_all(profiles, gpus("1xL4"), lora=True)}
    assert judged["vllm-bf16-tp1-pp1-feat_lora-h100"].reason == "built for H100; found NVIDIA L4"


def test_a_broken_profile_file_is_a_clear_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nbackend: trtllm\nprecision: bf16\n")
    with pytest.raises(ConfigError, match=r"^profile file .*bad.yaml is not a valid profile"):
        load_profiles(tmp_path)


def test_profiles_ship_in_the_wheel(tmp_path):
    """Installed from a wheel (not the source tree), the package still finds its profiles."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("lora_entrypoint-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    folder = "entrypoint/config/builtin_profiles"
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith(folder + "/")}
    expected = {p.name for p in (root / folder).glob("*.yaml")}
    assert shipped == expected and len(shipped) >= 30
    # and they load from there: unpack the wheel alone on sys.path
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    code = ("import entrypoint.config.profiles as p; print(p.__file__); "
            "print(len(p.load_profiles()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site")})
    where, count = out.stdout.split()
    assert where.startswith(str(tmp_path / "site")) and int(count) == len(expected)
