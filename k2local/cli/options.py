"""The flags run, serve and plan share (--max-context, --gpu-mem, --ram, --experts-on, --cpu-only), checked in one
place: the same range, default and help text everywhere, and a bad value is one line naming the flag (exit 2).

Also the notes these flags need once the model or the machine is known: --gpu-mem on a machine without a GPU, and
a --max-context beyond what the model supports.
"""
from __future__ import annotations

import math
from typing import Any, Callable, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_CONTEXT = 8192  # tokens, when --max-context is not given (capped at the model's max_position_embeddings)
MIN_CONTEXT = 16  # below this not even a chat template's framing fits


class GiB(click.ParamType):
    """A finite number of GiB: above zero, or zero and above when `zero_ok`."""

    name = "GIB"

    def __init__(self, zero_ok: bool = False, zero_hint: str = "") -> None:
        self.zero_ok, self.zero_hint = zero_ok, zero_hint

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            x = float(value)
        else:
            try:
                x = float(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a number of GiB", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number of GiB", param, ctx)
        if x < 0 or (x == 0 and not self.zero_ok):
            self.fail(f"{value} is too small: must be {'0 or more' if self.zero_ok else 'more than 0'} GiB"
                      + (f" ({self.zero_hint})" if x == 0 and self.zero_hint else ""), param, ctx)
        return x


class PositiveInt(click.ParamType):
    """A whole number of at least `low` `what` (tokens, chunks)."""

    name = "INTEGER"

    def __init__(self, low: int, what: str) -> None:
        self.low, self.what = low, what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            try:
                value = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is not a whole number of {self.what}", param, ctx)
        if value < self.low:
            self.fail(f"{value} is too small: must be at least {self.low} {self.what}", param, ctx)
        return value


MAX_CONTEXT = PositiveInt(MIN_CONTEXT, "tokens")
GPU_MEM = GiB(zero_hint="use --cpu-only to keep off the GPU")
RAM = GiB(zero_ok=True)


def placement_options(f: F) -> F:
    """--max-context, --gpu-mem, --ram, --experts-on and --cpu-only, identical for run, serve and plan."""
    opts = [
        click.option("--max-context", type=MAX_CONTEXT, default=None,
                     help=f"Context window in tokens, at least {MIN_CONTEXT} [default: {DEFAULT_CONTEXT}, or the "
                          "model's max_position_embeddings if smaller; serve: the model's max_position_embeddings, "
                          "or fewer tokens if their KV cache would take over 1/4 of the memory the non-expert weights "
                          "leave]."),
        click.option("--gpu-mem", type=GPU_MEM, default=None,
                     help="GiB of GPU memory to use [default: what is free, less 0.5 GiB]. Ignored without a GPU."),
        click.option("--ram", type=RAM, default=None,
                     help="GiB of RAM for routed experts [default: what is available, less a reserve]."),
        click.option("--experts-on", type=click.Choice(["ram", "disk"]), default=None,
                     help="Where routed experts live [default: RAM if they fit, else disk]."),
        click.option("--cpu-only", is_flag=True, help="Do not use a GPU."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def gpu_notes(gpu_mem: float | None, cpu_only: bool) -> list[str]:
    """What to tell the user about --gpu-mem when no GPU will be used (it would otherwise be silently ignored)."""
    if gpu_mem is None:
        return []
    if cpu_only:
        return [f"--gpu-mem {gpu_mem:g} is ignored with --cpu-only"]
    import torch  # noqa: PLC0415 (deferred: torch takes seconds to import; callers have it loaded by now)

    if not torch.cuda.is_available():
        return [f"--gpu-mem {gpu_mem:g} is ignored: no GPU (CUDA) is available, the model runs on the CPU"]
    return []


def context_notes(asked: int | None, used: int, model_limit: int) -> list[str]:
    """A note when --max-context asked for more than the model supports (the window is cut to the model's)."""
    if asked is not None and asked > used:
        return [f"--max-context {asked} is more than this model supports (max_position_embeddings "
                f"{model_limit}); using {used} tokens"]
    return []


def effective_context(asked: int | None, model_limit: int) -> int:
    """The context window a load uses: --max-context (or the default) capped at the model's limit."""
    return min(asked or DEFAULT_CONTEXT, model_limit)


def random_weights_notice(name: str) -> str:
    """The warning for a checkpoint from `k2local make-tiny` (or a GGUF converted from one)."""
    return (f"{name} has RANDOM WEIGHTS (made by k2local make-tiny): its answers are gibberish; it is for trying "
            "k2local and for tests")
