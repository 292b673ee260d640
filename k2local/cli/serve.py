"""`k2local serve`: the OpenAI-compatible HTTP server (and Anthropic /v1/messages) for one model."""
from __future__ import annotations

import ipaddress
import logging
import socket

import click

from k2local.cli.options import context_notes, gpu_notes, placement_options, random_weights_notice
from k2local.errors import K2Error


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket before loading the model, so a busy port fails in a second, not after minutes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise K2Error(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


@click.command("serve", short_help="Serve a model over an OpenAI-compatible (and Anthropic) HTTP API.")
@click.argument("model", required=False, type=click.Path(exists=True))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the model to your network.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", default=None, envvar="K2LOCAL_API_KEY",
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health (env K2LOCAL_API_KEY).")
@click.option("--served-model-name", default=None, help="Model id clients must send (default: the MODEL folder name).")
@placement_options
@click.option("--cache-slots", type=click.IntRange(min=1), default=4, show_default=True,
              help="Conversations whose KV cache is kept between requests (at least --parallel).")
@click.option("--parallel", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests served at once (batched into shared forward steps, each on its own KV cache); more wait queued.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(model: str | None, host: str, port: int, api_key: str | None, served_model_name: str | None,
          max_context: int | None, cache_slots: int, parallel: int, gpu_mem: float | None, ram: float | None,
          experts_on: str | None, cpu_only: bool, log_level: str) -> None:
    """Serve MODEL (a checkpoint folder or GGUF) over an OpenAI-compatible HTTP API.

    Endpoints: POST /v1/chat/completions, /v1/completions, /v1/messages (Anthropic); GET /v1/models, /health.
    Without MODEL the built-in tiny checkpoint is served (random weights: for trying the API only).
    """
    # Deferred (noqa: PLC0415): torch (engine, tiny) and fastapi/uvicorn (server) take seconds to import; `k2local
    # serve --help` and the checks below stay instant.
    import uvicorn  # noqa: PLC0415

    from k2local.engine import Engine, LoadOptions  # noqa: PLC0415
    from k2local.server.app import create_app  # noqa: PLC0415

    if not _is_loopback(host) and not api_key:
        click.secho(f"warning: listening on {host} without --api-key: anyone who can reach this port can use "
                    "the model", fg="yellow", err=True)
    sock = _bind(host, port)
    tiny_default = model is None
    if model is None:
        from k2local.tiny import default_tiny_path  # noqa: PLC0415

        model = str(default_tiny_path())
        click.secho("no MODEL given: serving the built-in tiny checkpoint. It has RANDOM WEIGHTS and answers "
                    "with nonsense; use it to try the API, then pass a real Kimi K2 checkpoint.", fg="yellow",
                    err=True)
    # no --max-context: as long as the model and the memory plan allow (agent clients send 40k-token prompts)
    opts = LoadOptions(max_context=max_context, context_from_memory=True, cpu_only=cpu_only, gpu_mem=gpu_mem,
                       ram=ram, experts_on=experts_on)
    for note in gpu_notes(gpu_mem, cpu_only):
        click.secho(f"note: {note}", fg="yellow", err=True)
    click.echo(f"loading {model} ...", err=True)
    engine = Engine.load(model, opts)
    for note in context_notes(max_context, engine.max_context, engine.source.config.max_position_embeddings):
        click.secho(f"note: {note}", fg="yellow", err=True)
    if engine.source.config.random_weights and not tiny_default:
        click.secho(f"warning: {random_weights_notice(model)}", fg="yellow", err=True)
    name = served_model_name or engine.name
    app = create_app(engine, name, api_key=api_key, cache_slots=cache_slots, parallel=parallel)
    logging.getLogger("k2local").setLevel(log_level.upper())
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"serving model '{name}' (context {engine.max_context} tokens) at http://{shown}:{bound}/v1"
               + (" (API key required)" if api_key else ""), err=True)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
