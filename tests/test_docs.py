"""The documentation that is generated or checked from the code."""

from pathlib import Path

from entrypoint.config.reference import configuration_reference
from entrypoint.config.settings import Settings, env_name

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_matches_the_settings_class():
    on_disk = (ROOT / "docs" / "configuration.md").read_text()
    assert on_disk == configuration_reference(), (
        "docs/configuration.md is stale: run `lora-entrypoint config-reference > "
        "docs/configuration.md`")


def test_every_setting_is_in_the_readme_table():
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        variable = "NIM_MODEL_NAME" if name == "model_name" else env_name(name)
        if name.startswith("vllm_"):  # vLLM's own variables, honoured as vLLM does
            variable = name.upper()
        assert f"`{variable}`" in readme, f"{variable} is missing from README.md's settings table"
