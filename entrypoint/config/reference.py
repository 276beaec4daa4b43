"""docs/configuration.md, made from the settings class: every variable, its type, default and
what it does. Must not read the environment."""

from __future__ import annotations

from entrypoint.config.settings import Settings, env_name
from entrypoint.sources.s3_client import S3Url


def configuration_reference() -> str:
    """`docs/configuration.md`, generated from this class (a test keeps the two in step)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `entrypoint/settings.py` by `lora-entrypoint config-reference`; a test",
        "fails when this file and the code disagree. Every setting is an environment variable;",
        "`serve` options override them. Booleans read true/1/yes/on and false/0/no/off. A bad",
        "value stops `serve` before the backend starts, with one line naming the variable.",
        "Variables marked (ours) are this project's additions to NIM's set.",
        "",
        "| variable | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        variable = env_name(name)
        if name == "model_name":
            variable = "NIM_MODEL_NAME` / `NIM_MODEL_PATH"
        elif name.startswith("vllm_"):
            variable = name.upper()
        kind = str(field.annotation).replace("pathlib.", "").replace("typing.", "")
        kind = kind.replace(f"Path | {S3Url.__module__}.{S3Url.__qualname__}",
                            "folder or s3:// URL")
        kind = kind.replace("<class '", "").replace("'>", "").replace(" | None", " (optional)")
        default = "unset" if field.default is None else f"`{field.default}`"
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{variable}` | {kind} | {default} | {description} |")
    return "\n".join(lines) + "\n"


