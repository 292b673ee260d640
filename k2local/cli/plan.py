"""`k2local plan MODEL`: where each part of the model would go, whether it fits, and the decode speed to expect."""
from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

from k2local.cli.options import (context_notes, effective_context, gpu_notes, placement_options,
                                 random_weights_notice)
from k2local.weights.hf_checkpoint import open_checkpoint
from k2local.placement import LoadOptions, layout_for, make_plan, pick_device, pick_dtype
from offload.options import OffloadOptions
from offload.planner import Bandwidths, Plan, decode_breakdown, human, predict_decode_tps
from offload.probe import measure_bandwidths

TYPICAL = Bandwidths(ram=20.0, disk=2.0, cpu_expert=None, gpu=1000.0, h2d=12.0)


_size = human


def plan_table(p: Plan) -> Table:
    t = Table(title=f"k2local plan: {p.model}  ({p.device}, {p.dtype})", title_justify="left")
    t.add_column("tier")
    t.add_column("holds")
    t.add_column("size", justify="right")
    t.add_column("note")
    last = None
    for tier, what, n, note in p.tier_rows():
        t.add_row(tier if tier != last else "", what, _size(n), note, end_section=False)
        last = tier
    dev = "GPU" if not p.cpu_only else "RAM (compute)"
    if not p.cpu_only:
        t.add_row(f"{dev} total", "", _size(p.device_total), f"budget {_size(p.vram_budget)}", style="bold")
    ram_total = p.store_bytes + (p.device_total if p.cpu_only else 0)
    t.add_row("RAM total", "", _size(ram_total),
              f"expert budget {_size(p.ram_budget)}, available {_size(p.ram_available)}", style="bold")
    return t


def bandwidth_table(bw: Bandwidths, measured: bool) -> Table:
    t = Table(title="bandwidths" + (" (measured now)" if measured else " (typical figures, not measured)"),
              title_justify="left")
    t.add_column("path")
    t.add_column("GB/s", justify="right")
    rows = [("RAM read", bw.ram),
            ("disk read, whole experts" + ("" if bw.disk_direct else " (page cache may have helped)"), bw.disk),
            ("disk read, raw O_DIRECT, several in flight (best depth)", bw.disk_parallel),
            ("disk read, raw O_DIRECT, one at a time", bw.disk_one_stream),
            ("CPU expert kernel, decode", bw.cpu_expert), ("GPU memory", bw.gpu), ("host to GPU (pinned)", bw.h2d)]
    for name, v in rows:
        if v is not None:
            t.add_row(name, f"{v:.2f}")
    return t


@click.command("plan", short_help="Show where a model's weights would go, whether it fits, and the speed to expect.")
@click.argument("model", type=click.Path(path_type=Path))
@placement_options
@click.option("--routing-stats", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Saved routing statistics to pick GPU-resident experts [default: the model's cache file].")
@click.option("--no-measure", is_flag=True, help="Skip the one-second bandwidth measurements; typical figures.")
@click.option("--json", "json_out", is_flag=True, help="Print the plan and prediction as JSON.")
def plan(model: Path, gpu_mem: float | None, ram: float | None, experts_on: str | None, cpu_only: bool,
         max_context: int | None, routing_stats: Path | None, no_measure: bool, json_out: bool) -> None:
    """Show where MODEL's weights would go (GPU / RAM / disk), whether it fits, and the decode speed to expect.

    A plan that cannot fit is refused with what to change, before anything is loaded.
    """
    opts = LoadOptions(cpu_only=cpu_only, gpu_mem=gpu_mem, ram=ram, experts_on=experts_on, max_context=max_context,
                       offload=OffloadOptions(routing_stats=str(routing_stats) if routing_stats else None))
    source = open_checkpoint(model)
    device = pick_device(opts)
    dtype = pick_dtype(opts, device, source)
    layout = layout_for(source)
    p = make_plan(source, opts, device, dtype, layout=layout)
    limit = source.config.max_position_embeddings
    random_weights = source.config.random_weights
    p.notes[:0] = ([random_weights_notice(str(model))] if random_weights else []) + gpu_notes(gpu_mem, cpu_only) + context_notes(max_context, effective_context(max_context, limit),
                                                                limit)
    typical = TYPICAL if device.type == "cuda" else replace(TYPICAL, gpu=None, h2d=None)  # no GPU: no GPU rows
    bw = typical if no_measure else measure_bandwidths(layout, device, dtype)
    tps = predict_decode_tps(p, bw)
    if json_out:
        d = asdict(p)
        d["device_experts"] = len(p.device_experts)
        click.echo(json.dumps({"plan": d, "random_weights": random_weights, "bandwidths": asdict(bw), "measured": not no_measure,
                               "predicted_decode_tps": tps, "assumed_hit_rate": p.hit_rate,
                               "expert_bytes_per_token": decode_breakdown(p)}))
        return
    con = Console()
    con.print(plan_table(p))
    con.print(bandwidth_table(bw, not no_measure))
    br = decode_breakdown(p)
    parts = ", ".join(f"{_size(v)} from {k}" for k, v in br.items() if v > 0)
    hit = (f"; assumes a {p.hit_rate:.0%} RAM hit rate for the experts not on the GPU"
           + ("" if Path(p.stats_path or "").exists() else " (no routing statistics yet: the cache's share)")
           if p.experts_on == "disk" else "")
    con.print(f"[bold]predicted decode: {tps:.2f} tokens/s[/bold]  (routed expert bytes per token: {parts}; "
              f"{p.top_k} of {p.n_experts} experts x {p.n_moe_layers} MoE layers{hit})")
    for n in p.notes:
        con.print(f"[yellow]note:[/yellow] {n}")
    if torch.cuda.is_available() and cpu_only:
        con.print("[dim]a GPU is present; --cpu-only keeps everything on the CPU[/dim]")
