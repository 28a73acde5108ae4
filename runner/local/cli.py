"""``firetitan-track local up|info|down``: the local service from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from firetitan_track.cli import user_errors

from . import supervisor
from .state import DEFAULT_STATE_DIR, TOKEN_ENV

STATE_DIR_OPTION = click.option(
    "--state-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_STATE_DIR,
    show_default=True, help="Where the service keeps jobs, checkpoints, snapshots and its pid/port file.")


@click.group()
def local() -> None:
    """The embedded FireTitan-compatible service on 127.0.0.1 (no API key needed)."""


@local.command()
@STATE_DIR_OPTION
@click.option("--port", type=int, default=0, show_default=True, help="TCP port (0: any free port).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="cuda: the GPU (deployments in bfloat16 where it supports it); an error if there is none.")
@click.option("--model-dir", "model_dirs", multiple=True, metavar="[NAME=]DIR",
              help="Serve the Hugging Face checkpoint in DIR (config.json, *.safetensors, tokenizer) instead of a "
                   "seeded stand-in, as NAME (accounts/<a>/models/<id>; default accounts/local/models/<DIR's "
                   "name>). Repeatable; the first is the default base model. Remembered by the state dir.")
@click.option("--log-requests", is_flag=True,
              help="Log every request (method, path, status, time) to service.log in the state dir; refused "
                   "requests are always logged. Headers, bodies and query strings never are.")
@click.option("--token", envvar=TOKEN_ENV, default=None, metavar="TOKEN",
              help=f"Require this bearer token of every client (clients send it as their API key). Prefer the "
                   f"{TOKEN_ENV} environment variable, which keeps it out of process listings.")
def up(state_dir: Path, port: int, device: str, model_dirs: tuple[str, ...], log_requests: bool,
       token: str | None) -> None:
    """Start the service in the background and print one JSON line describing it.

    If a service already runs on STATE_DIR it is reused and described.
    """
    from . import catalogue

    with user_errors():
        checked = {}
        for value in model_dirs:  # checked here, so a bad directory starts nothing
            name, directory = catalogue.parse_model_dir(value)
            checked[catalogue.load_model_dir(directory, name).name] = directory
        info = supervisor.ensure_running(state_dir, port=port, device=device, model_dirs=checked,
                                         log_requests=log_requests, token=token or None)
    click.echo(json.dumps(info.public()))


@local.command()
@STATE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the JSON line `local up` prints.")
def info(state_dir: Path, as_json: bool) -> None:
    """Describe the running service (exit code 1 if none runs)."""
    current = supervisor.running(state_dir)
    if current is None:
        click.echo(f"no local service is running on {state_dir}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(current.public()))
        return
    for key, value in current.public().items():
        click.echo(f"{key}: {value}")


@local.command()
@STATE_DIR_OPTION
def down(state_dir: Path) -> None:
    """Stop the service running on STATE_DIR (its files stay for the next `up`)."""
    if supervisor.stop(state_dir):
        click.echo(f"stopped the local service on {state_dir}")
    else:
        click.echo(f"no local service was running on {state_dir}")


@local.command()
@STATE_DIR_OPTION
def env(state_dir: Path) -> None:
    """Print the shell lines that point an unmodified Tinker program at the running service,
    offline: `eval "$(firetitan-track local env)"`, then run the program as it is."""
    import shlex

    from .state import HF_CACHE_DIR

    current = supervisor.running(state_dir)
    if current is None:
        click.echo(f"no local service is running on {state_dir}; start it with `firetitan-track local up`", err=True)
        sys.exit(1)
    lines = {
        "TINKER_BASE_URL": current.base_url,
        "TINKER_API_KEY": "tml-local",              # any key: the local service checks none
        "HF_HUB_OFFLINE": "1",                      # tokenizers from the service's cache, never the hub
        "HF_HUB_CACHE": str((Path(current.state_dir or state_dir) / HF_CACHE_DIR).resolve()),
    }
    for key, value in lines.items():
        click.echo(f"export {key}={shlex.quote(value)}")
