"""Command line: `lora-entrypoint serve | demo`.

Turns user errors into one line on stderr and a non-zero exit, never a traceback. The work itself
lives in `service`, `adapters` and `demo`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .logs import setup_logging
from .settings import ConfigError, Settings, load_settings

EXIT_CONFIG = 2

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Serve one base LLM plus hot-swapped LoRA adapters on vLLM, configured like NIM.",
)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_CONFIG)


def _settings(*, need_model: bool = True, **overrides: Any) -> Settings:
    try:
        return load_settings(need_model=need_model, **overrides)
    except ConfigError as exc:
        fail(str(exc))
        raise  # unreachable


def _run_service(
    settings: Settings,
    *,
    host: str,
    backend_port: int | None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    from .service import serve as run_serve

    setup_logging(settings.log_level, jsonl=settings.jsonl_logging)
    try:
        code = run_serve(settings, host=host, backend_port=backend_port, on_ready=on_ready)
    except ConfigError as exc:
        fail(str(exc))
        return
    raise typer.Exit(code)


@app.command()
def serve(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the resolved plan as JSON; start nothing.")
    ] = False,
    host: Annotated[str, typer.Option(help="Address of the public port.")] = "0.0.0.0",
    port: Annotated[int | None, typer.Option(help="Public port (NIM_SERVER_PORT).")] = None,
    model: Annotated[str | None, typer.Option(help="Base model (NIM_MODEL_NAME).")] = None,
    peft_source: Annotated[
        Path | None, typer.Option(help="Adapter folder (NIM_PEFT_SOURCE).")
    ] = None,
    refresh_interval: Annotated[
        float | None, typer.Option(help="Seconds between scans (NIM_PEFT_REFRESH_INTERVAL).")
    ] = None,
    profile: Annotated[
        str | None, typer.Option(help="Profile name or id (NIM_MODEL_PROFILE).")
    ] = None,
    backend_port: Annotated[
        int | None, typer.Option(help="Loopback port of the backend (default: a free one).")
    ] = None,
) -> None:
    """Start the backend with the right LoRA flags and serve the public port."""
    settings = _settings(
        server_port=port, model_name=model, peft_source=peft_source,
        peft_refresh_interval=refresh_interval, model_profile=profile,
    )
    if dry_run:
        from .service import resolve

        setup_logging(settings.log_level, jsonl=settings.jsonl_logging)
        try:
            startup = resolve(settings, backend_port=backend_port or 0, dry_run=True)
        except ConfigError as exc:
            fail(str(exc))
            return
        described = startup.plan.describe()
        described["adapters"] = [
            {"name": a.name, "path": str(a.path), "valid": a.valid, "rank": a.rank,
             "reason": a.problem}
            for a in startup.adapters
        ]
        typer.echo(json.dumps(described, indent=2))
        return
    _run_service(settings, host=host, backend_port=backend_port)


@app.command("list-model-profiles")
def list_model_profiles(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Print the GPUs, then every profile in NIM's groups, marking the one that would be chosen."""
    from .hardware import detect_gpus
    from .profiles import assess_all, load_profiles, model_parameters

    settings = _settings(need_model=False)
    try:
        profiles = load_profiles(*([settings.profiles_path] if settings.profiles_path else []))
    except ConfigError as exc:
        fail(str(exc))
        return
    gpus = detect_gpus()
    judged = assess_all(profiles, gpus, lora=settings.peft_source is not None,
                        params=model_parameters(settings.model_name),
                        wanted=settings.model_profile)
    if as_json:
        typer.echo(json.dumps([a.describe() for a in judged], indent=1))
        return
    typer.echo("SYSTEM INFO")
    if gpus:
        typer.echo("- GPUs:")
        for gpu in gpus:
            typer.echo(f"  - ({gpu.index}) {gpu.name} [{gpu.memory_gib:.0f} GiB, compute "
                       f"capability {gpu.compute_capability}]")
    else:
        typer.echo("- GPUs: none (CPU only)")
    typer.echo("MODEL PROFILES")

    def line(a: Any, note: str = "") -> str:
        mark = "  <- selected" if a.selected else ""
        return f"{a.profile.id} ({a.profile.name}){note}{mark}"

    groups = [
        ("- Compatible with system and runnable:",
         [a for a in judged if a.runnable and not a.profile.lora], ""),
        ("  - With LoRA support:", [a for a in judged if a.runnable and a.profile.lora], "  "),
    ]
    for title, items, indent in groups:
        typer.echo(title + ("" if items else " none"))
        for a in items:
            typer.echo(f"{indent}  - {line(a)}")
    low = [a for a in judged if a.compatible and a.low_memory]
    typer.echo("- Compatible with system but low on memory:" + ("" if low else " none"))
    for a in low:
        typer.echo(f"  - {line(a, f': {a.low_memory}')}")
    bad = [a for a in judged if not a.compatible]
    typer.echo("- Incompatible with system:" + ("" if bad else " none"))
    for a in bad:
        typer.echo(f"  - {line(a, f': {a.reason}')}")


@app.command("check-adapters")
def check_adapters(
    folder: Annotated[
        Path | None, typer.Argument(help="Adapter folder (default: NIM_PEFT_SOURCE).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Validate adapter folders exactly as `serve` does; exit 1 if any is invalid.

    The rank limit is the one `serve` would use with these folders: NIM_MAX_LORA_RANK, or
    derived from them for the backend of the profile `serve` would choose.
    """
    from .launch import plan_backend
    from .service import choose_profile, judge_adapters

    settings = _settings(need_model=False, peft_source=folder)
    if settings.peft_source is None:
        fail("no adapter folder: pass DIR or set NIM_PEFT_SOURCE")
        return
    try:
        backend = plan_backend(settings, choose_profile(settings, dry_run=True)[0])
        adapters, limit = judge_adapters(settings, backend)
    except ConfigError as exc:
        fail(str(exc))
        return
    if as_json:
        typer.echo(json.dumps([
            {"name": a.name, "valid": a.valid, "pending": a.pending, "rank": a.rank,
             "target_modules": list(a.target_modules), "size": a.size,
             "fingerprint": a.fingerprint, "path": str(a.path), "reason": a.problem}
            for a in adapters
        ], indent=1))
    else:
        for a in adapters:
            status = "ok" if a.valid else "pending" if a.pending else "invalid"
            detail = f"rank {a.rank}" if a.valid else a.problem
            typer.echo(f"{a.name}\t{status}\t{detail}")
        invalid = sum(not a.valid for a in adapters)
        typer.echo(f"{len(adapters)} adapters, {invalid} not valid; rank limit "
                   f"{limit.describe()}", err=True)
    raise typer.Exit(1 if any(not a.valid for a in adapters) else 0)


@app.command("config-reference", hidden=True)
def config_reference() -> None:
    """Print docs/configuration.md, generated from the settings class."""
    from .settings import configuration_reference

    typer.echo(configuration_reference(), nl=False)


@app.command()
def demo(
    port: Annotated[int | None, typer.Option(help="Public port (NIM_SERVER_PORT).")] = None,
) -> None:
    """Build the tiny demo model and adapters (once) and serve them in dynamic mode."""
    cache = Path(os.environ.get("NIM_CACHE_PATH", ".cache")).resolve()
    typer.echo(f"building the demo model and adapters under {cache / 'demo'} (once) ...")
    from .demo import DEMO_ADAPTERS, build_demo

    assets = build_demo(cache / "demo")
    first = next(iter(DEMO_ADAPTERS))
    if not any(assets.loras.iterdir()):
        shutil.copytree(assets.library / first, assets.loras / f".{first}.tmp")
        os.replace(assets.loras / f".{first}.tmp", assets.loras / first)
    defaults = {
        "NIM_MODEL_NAME": str(assets.model),
        "NIM_SERVED_MODEL_NAME": "tiny-llama",
        "NIM_PEFT_SOURCE": str(assets.loras),
        "NIM_PEFT_REFRESH_INTERVAL": "2",
        "NIM_MAX_MODEL_LEN": "512",
        "NIM_CACHE_PATH": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    settings = _settings(server_port=port)
    url = f"http://localhost:{settings.server_port}"
    other = [name for name in DEMO_ADAPTERS if name != first]
    loras = settings.peft_source
    assert loras is not None  # set just above

    def instructions() -> None:
        print(
            f"""
================================================================================
 lora-entrypoint demo is ready on {url}  (base model: {settings.served_name})
 Watched adapter folder: {loras}
 Adapter library (copy from here): {assets.library}

 Try the adapter already there:
   curl {url}/v1/models
   curl {url}/v1/completions -H 'Content-Type: application/json' \\
     -d '{{"model": "{first}", "prompt": "Hello", "max_tokens": 16, "temperature": 0}}'

 Hot-add another adapter (copy into the watched folder):
   cp -r {assets.library / other[0]} {loras}/
   curl {url}/v1/completions -H 'Content-Type: application/json' \\
     -d '{{"model": "{other[0]}", "prompt": "Hello", "max_tokens": 16, "temperature": 0}}'

 Remove it again (the same request then gets 404):
   rm -r {loras / other[0]}

 Stop with Ctrl+C.
================================================================================
""",
            flush=True,
        )

    _run_service(settings, host="0.0.0.0", backend_port=None, on_ready=instructions)


def main() -> None:
    try:
        app(prog_name="lora-entrypoint")
    except KeyboardInterrupt:
        sys.exit(130)


def list_profiles_main() -> None:
    """The `list-model-profiles` console script (NIM's name for the same listing)."""
    sys.argv[1:1] = ["list-model-profiles"]
    main()
