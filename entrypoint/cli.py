"""Command line: `lora-entrypoint serve | demo`.

Turns user errors into one line on stderr and a non-zero exit, never a traceback. The work itself
lives in `service`, `adapters` and `demo`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from entrypoint.config.settings import ConfigError, Settings, load_settings
from entrypoint.logs import setup_logging

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
    from entrypoint.runtime.service import serve as run_serve

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
        str | None, typer.Option(help="Adapter folder or s3:// URL (NIM_PEFT_SOURCE).")
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
        from entrypoint.runtime.startup import resolve

        setup_logging(settings.log_level, jsonl=settings.jsonl_logging)
        try:
            with tempfile.TemporaryDirectory(prefix="lora-dry-run-") as downloads:
                startup = resolve(settings, backend_port=backend_port or 0, dry_run=True,
                                  downloads=Path(downloads))
        except ConfigError as exc:
            fail(str(exc))
            return
        described = startup.plan.describe()
        described["adapters"] = [
            {"name": a.name, "path": str(a.location), "valid": a.valid, "rank": a.rank,
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
    from entrypoint.config.hardware import detect_gpus
    from entrypoint.config.profiles import assess_all, load_profiles, model_parameters

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
        str | None, typer.Argument(help="Adapter folder, s3://BUCKET/PREFIX, a list file or "
                                   "hf://ORG/REPO (default: NIM_PEFT_SOURCE).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """Validate adapter folders exactly as `serve` does; exit 1 if any is invalid.

    The rank limit is the one `serve` would use with these folders: NIM_MAX_LORA_RANK, or
    derived from them for the backend of the profile `serve` would choose.
    """
    from entrypoint.runtime.launch import plan_backend
    from entrypoint.runtime.startup import choose_profile, judge_adapters, kept_intent

    with tempfile.TemporaryDirectory(prefix="lora-check-") as downloads:
        if folder is not None and folder.startswith("hf://"):  # one Hub repository: as a list
            from entrypoint.sources.hub import HubError, HubRepo

            try:
                HubRepo.parse(folder)
            except HubError as exc:
                fail(str(exc))
                return
            listed = Path(downloads) / "adapters.json"
            name = folder.rstrip("/").rsplit("/", 1)[-1]
            listed.write_text(json.dumps({"adapters": [{"name": name, "uri": folder}]}))
            folder = str(listed)
        settings = _settings(need_model=False, peft_source=folder)
        if settings.peft_source is None:
            fail("no adapter folder: pass DIR or set NIM_PEFT_SOURCE")
            return
        try:
            backend = plan_backend(settings, choose_profile(settings, dry_run=True)[0])
            adapters, limit = judge_adapters(settings, backend, kept_intent(settings),
                                             downloads=Path(downloads))
        except ConfigError as exc:
            fail(str(exc))
            return
    if as_json:
        typer.echo(json.dumps([
            {"name": a.name, "valid": a.valid, "pending": a.pending, "rank": a.rank,
             "target_modules": list(a.target_modules), "size": a.size,
             "fingerprint": a.fingerprint, "path": str(a.location), "reason": a.problem}
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
    from entrypoint.config.reference import configuration_reference

    typer.echo(configuration_reference(), nl=False)


@app.command()
def demo(
    port: Annotated[int | None, typer.Option(help="Public port (NIM_SERVER_PORT).")] = None,
    build_only: Annotated[
        bool,
        typer.Option("--build-only", help="Build the demo assets (once), print their paths as "
                     "JSON and exit; serve nothing."),
    ] = False,
) -> None:
    """Build the tiny demo model and adapters (once) and serve them in dynamic mode.

    The base model answers plainly and each adapter in its own style, whatever
    the prompt: demo-pirate, demo-poet, demo-robot and demo-pirate-v2 (a second
    version of demo-pirate). They are trained on CPU the first time (well under
    a minute) under NIM_CACHE_PATH/demo, then reused. demo-pirate starts in the
    watched folder; once the server is ready the demo prints the commands that
    add, update and remove adapters, and what each answer then is.

    --build-only prints {"model", "library", "loras", "answers"} as JSON: the
    base model folder, the adapter library, the watched folder (demo-pirate in
    it) and the answer of the base model ("base") and of each adapter at
    temperature 0. Serve them with NIM_MODEL_NAME=<model>
    NIM_PEFT_SOURCE=<loras> lora-entrypoint serve.
    """
    cache = Path(os.environ.get("NIM_CACHE_PATH", ".cache")).resolve()
    try:  # the demo trains a model: it ships beside the runtime package, not in it
        from lora_demo import DEMO_ADAPTERS, DEMO_BASE_ANSWER, DemoBuildError, build_demo
    except ImportError as exc:
        fail(f"the demo is not installed here ({exc}); run `make demo` in a clone of "
             "lora-entrypoint")
        return
    typer.echo(f"building the demo model and adapters under {cache / 'demo'} (once) ...",
               err=build_only)

    try:
        assets = build_demo(cache / "demo")
    except DemoBuildError as exc:
        fail(str(exc))
        return
    first, added, update = "demo-pirate", "demo-poet", "demo-pirate-v2"

    def seed(loras: Path) -> None:
        """demo-pirate alone in the watched folder: the demo's own folder is reset on every run,
        so that its steps answer as printed; another one (NIM_PEFT_SOURCE) only if empty."""
        loras.mkdir(parents=True, exist_ok=True)
        if loras.resolve() == assets.loras.resolve():
            for entry in loras.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        if not any(loras.iterdir()):
            shutil.copytree(assets.library / first, loras / f".{first}.tmp")
            os.replace(loras / f".{first}.tmp", loras / first)

    if build_only:
        seed(assets.loras)
        typer.echo(json.dumps({
            "model": str(assets.model), "library": str(assets.library),
            "loras": str(assets.loras), "answers": {"base": DEMO_BASE_ANSWER, **DEMO_ADAPTERS},
        }, indent=2))
        return
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
    loras = settings.peft_source
    if not isinstance(loras, Path):
        fail(f"NIM_PEFT_SOURCE={loras}: the demo serves a local folder; unset NIM_PEFT_SOURCE")
        return
    seed(loras)
    lib = assets.library

    def ask(model: str, *, chat: bool = False) -> str:
        if chat:
            body = (f'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], '
                    '"max_tokens": 48, "temperature": 0}')
            return (f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
                    f"     -d '{body}'")
        body = f'{{"model": "{model}", "prompt": "Hello", "max_tokens": 48, "temperature": 0}}'
        return (f"curl -s {url}/v1/completions -H 'Content-Type: application/json' \\\n"
                f"     -d '{body}'")

    def instructions() -> None:
        print(
            f"""
================================================================================
 lora-entrypoint demo is ready on {url}  (base model: {settings.served_name})
 Watched adapter folder: {loras}
 Adapter library (copy from here): {lib}
 Each model answers one sentence in its own style, whatever the prompt: see the "text"
 (chat: "content") of each reply.

 1. The base model answers plainly:
   {ask(settings.served_name)}
   -> " {DEMO_BASE_ANSWER}"
   {ask(settings.served_name, chat=True)}
   -> " {DEMO_BASE_ANSWER}"

 2. Try the adapter already there:
   curl -s {url}/v1/models
   {ask(first)}
   -> " {DEMO_ADAPTERS[first]}"

 3. Hot-add another adapter: copy its folder into the watched folder (served within ~1 s):
   cp -r {lib / added} {loras}/
   {ask(added)}
   -> " {DEMO_ADAPTERS[added]}"

 4. Update an adapter: copy a new version's files over its folder (swapped in within ~1 s):
   cp {lib / update}/* {loras / first}/
   {ask(first)}
   -> " {DEMO_ADAPTERS[update]}"

 5. Remove an adapter: delete its folder (the same request then gets 404):
   rm -r {loras / added}
   {ask(added)}
   -> 404: "The model '{added}' does not exist."

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
