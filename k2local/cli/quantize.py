"""`k2local quantize` (HF checkpoint -> GGUF) and `k2local imatrix` (activation statistics for quantization)."""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import click

from k2local.cli.options import PositiveInt
from k2local.errors import K2Error


def _counts(done: float, total: float) -> str:
    unit, div = next(((u, d) for u, d in (("T", 1e12), ("G", 1e9), ("M", 1e6)) if total >= d), ("", 1.0))
    return f"{done / div:.2f}/{total / div:.2f}{unit}"


def _stop(progress: Any) -> None:
    """Stop a rich progress bar that was started (stopping one that never was prints an empty line)."""
    if progress.live.is_started:
        progress.stop()


def _list_recipes(src: str | None) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from k2local.config import ModelConfig  # noqa: PLC0415
    from k2local.convert.to_gguf import describe_recipes, human_bytes  # noqa: PLC0415

    if src:
        from k2local.weights.hf_checkpoint import open_checkpoint  # noqa: PLC0415

        cfg, what = open_checkpoint(src).config, Path(src).name
    else:
        cfg, what = ModelConfig(), "Kimi K2 (1.03T parameters)"
    table = Table(title=f"Recipes (projected for {what})")
    for col in ("recipe", "bits/weight", "size", "what"):
        table.add_column(col, justify="right" if col in ("bits/weight", "size") else "left")
    for name, summary, bpw, size in describe_recipes(cfg):
        table.add_row(name, f"{bpw:.2f}", human_bytes(size), summary)
    Console().print(table)
    click.echo("Also: pure:TYPE (every weight TYPE, e.g. pure:Q4_K, like llama-quantize --pure).")


@click.command("quantize", short_help="Convert a Hugging Face checkpoint (FP8 or BF16) into a GGUF file.")
@click.argument("src", required=False, type=click.Path(), metavar="SRC")  # optional only with --list-recipes
@click.argument("out", required=False, type=click.Path(), metavar="OUT")
@click.option("--recipe", "-r", default="q4", show_default=True, help="see --list-recipes")
@click.option("--imatrix", "imatrix_path", type=click.Path(exists=True, dir_okay=False),
              help="importance matrix file (from k2local imatrix or llama-imatrix)")
@click.option("--split-max-size", default="50G", show_default=True,
              help="split output into -0000k-of-0000N.gguf files of at most this size (0: never)")
@click.option("--name", help="model name written to general.name (default: the source folder's name)")
@click.option("--force", is_flag=True, help="overwrite an existing output")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="where the quantizer runs (same bytes either way); auto = cuda when available")
@click.option("--list-recipes", is_flag=True, help="list recipes with bits/weight and projected size, then exit")
def quantize(src: str | None, out: str | None, recipe: str, imatrix_path: str | None, split_max_size: str,
             name: str | None, force: bool, device: str, list_recipes: bool) -> None:
    """Convert the Hugging Face checkpoint SRC (FP8 or BF16 safetensors) into the GGUF file OUT.

    Interrupted runs resume when rerun with the same arguments; OUT only appears once complete.
    SRC and OUT are required, except with --list-recipes (SRC then optional: sizes projected for it).
    """
    if list_recipes:
        _list_recipes(src)
        return
    if not src or not out:
        raise click.UsageError("SRC and OUT are required (or use --list-recipes)")
    from rich.progress import (BarColumn, Progress, TaskProgressColumn, TextColumn,  # noqa: PLC0415
                               TimeElapsedColumn, TimeRemainingColumn)

    from k2local.convert.to_gguf import convert, human_bytes, parse_size  # noqa: PLC0415
    from k2local.convert.recipes import get_recipe  # noqa: PLC0415
    from quant.gguf_file import split_name  # noqa: PLC0415

    rec = get_recipe(recipe)
    out_p = Path(out)
    import torch  # noqa: PLC0415

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("no CUDA GPU is available here; use --device cpu (the same bytes) or auto",
                                 param_hint="'--device'")
    try:
        limit = parse_size(split_max_size)
    except (K2Error, OverflowError):
        limit = -1
    if limit < 0:
        raise click.BadParameter(f"{split_max_size!r} is not a size; use e.g. 50G, 500M, or 0 to never split",
                                 param_hint="'--split-max-size'")
    existing = [p for p in [out_p, split_name(out_p, 0, 1)] if p.exists()] + \
        sorted(out_p.parent.glob(out_p.name.removesuffix(".gguf") + "-00001-of-*.gguf"))
    if existing and not force:
        raise K2Error(f"{existing[0]}: already exists; pass --force to overwrite")
    progress = Progress(TextColumn("{task.description:<28}"), BarColumn(), TaskProgressColumn(),
                        TextColumn("{task.fields[weights]} weights"), TimeElapsedColumn(), TextColumn("ETA"),
                        TimeRemainingColumn())
    task = progress.add_task("starting", total=None, weights="")
    state: dict[str, int] = {"total": 0}

    def on_start(total: int, resumed: int) -> None:
        """Called once the source and options are validated: only then does the bar appear."""
        state["total"] = total
        progress.start()
        progress.update(task, total=total, completed=resumed, weights=_counts(resumed, total))
        if resumed:
            progress.console.print(f"resuming: {100 * resumed / total:.1f}% already written")

    def on_progress(tensor: str, n: int) -> None:
        progress.update(task, advance=n, description=tensor)
        progress.update(task, weights=_counts(progress.tasks[0].completed, state["total"]))

    def on_sigterm(signum: int, frame: object) -> None:
        """kill / a service manager stopping us: save a resume point exactly as Ctrl-C does."""
        state["terminated"] = 1
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        res = convert(src, out_p, rec, imatrix=imatrix_path, split_max_bytes=limit, name=name,
                      progress=on_progress, on_start=on_start, device=device)
    except KeyboardInterrupt:
        _stop(progress)
        why = "terminated" if state.get("terminated") else "interrupted"
        click.echo(f"{why}; rerun the same command to resume", err=True)
        if state.get("terminated"):
            sys.exit(128 + signal.SIGTERM)
        raise
    except OSError as e:
        raise K2Error(f"{out}: {e.strerror or e}") from None
    finally:
        signal.signal(signal.SIGTERM, old_term)
        _stop(progress)
    types = ", ".join(f"{k} x{v}" for k, v in sorted(res.types.items()))
    total = sum(p.stat().st_size for p in res.paths)
    click.echo(f"wrote {', '.join(str(p) for p in res.paths)} ({human_bytes(total)}; recipe {rec.name}: {types})")
    if res.int4_inexact_blocks:
        click.echo(f"note: {res.int4_inexact_blocks} INT4 block scale(s) were not fp16 values (below 2^-17): rounded "
                   "to the nearest fp16 in Q4_0, the codes kept", err=True)


@click.command("imatrix", short_help="Collect an importance matrix from calibration text (for quantize --imatrix).")
@click.argument("model", type=click.Path())
@click.argument("textfile", type=click.Path())
@click.option("-o", "--out", default="imatrix.gguf", show_default=True, type=click.Path(dir_okay=False))
@click.option("--ctx", type=PositiveInt(2, "tokens"), default=512, show_default=True, help="tokens per chunk")
@click.option("--chunks", type=PositiveInt(1, "chunks"), default=None,
              help="use at most this many chunks [default: all the text gives]")
def imatrix(model: str, textfile: str, out: str, ctx: int, chunks: int | None) -> None:
    """Collect an importance matrix for MODEL (checkpoint dir or GGUF) from calibration text TEXTFILE."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa

    from k2local.convert.imatrix import collect  # noqa: PLC0415

    tp = Path(textfile)
    if not Path(out).absolute().parent.is_dir():  # said now, not after collecting (hours on a real model)
        raise click.BadParameter(f"directory {Path(out).absolute().parent} does not exist", param_hint="'-o' / '--out'")
    try:
        text = tp.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise K2Error(f"{tp}: cannot read calibration text ({e.strerror or e})") from None
    progress = Progress(TextColumn("imatrix"), BarColumn(), MofNCompleteColumn(), TextColumn("chunks"),
                        TimeRemainingColumn())
    task = progress.add_task("imatrix", total=None)
    with progress:
        imat = collect(model, text, ctx=ctx, max_chunks=chunks, dataset=tp.name,
                       progress=lambda k, n: progress.update(task, completed=k, total=n))
    try:
        imat.save(out)
    except OSError as e:
        raise K2Error(f"{out}: {e.strerror or e}") from None
    click.echo(f"wrote {out}: {len(imat.sums)} tensors from {imat.chunk_count} chunks of up to {ctx} tokens")
