"""Engine: a loaded model with its tokenizer and chat template; what the CLI and the server drive."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from k2local.checkpoint import WeightSource, open_checkpoint
from k2local.generate import Generator
from k2local.model import ExpertBackend, KimiK2Model


@dataclass
class LoadOptions:
    """How to place the model. Offload flags (gpu_mem, ram, experts_on) are read by offload's planner."""

    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: float32 on CPU for small models, bfloat16 otherwise
    max_context: int | None = None
    cpu_only: bool = False
    gpu_mem: float | None = None  # GiB of VRAM to use
    ram: float | None = None  # GiB of RAM for experts
    experts_on: str | None = None  # "ram" | "disk" | None (planner decides)
    # keep non-expert GGUF weights block-quantized on the GPU (None: only when their bf16 copy would not fit)
    quantized_weights: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _pick_device(opts: LoadOptions) -> torch.device:
    if opts.device:
        return torch.device(opts.device)
    if not opts.cpu_only and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _pick_dtype(opts: LoadOptions, device: torch.device, source: WeightSource) -> torch.dtype:
    if opts.dtype:
        return getattr(torch, opts.dtype)
    cfg = source.config
    small = cfg.hidden_size * cfg.num_hidden_layers < 50_000
    return torch.float32 if device.type == "cpu" and small else torch.bfloat16


class Engine:
    """Model + tokenizer + chat template + context limit."""

    def __init__(self, source: WeightSource, model: KimiK2Model, tokenizer, template, max_context: int,
                 name: str):
        self.source, self.model, self.tokenizer, self.template = source, model, tokenizer, template
        self.max_context, self.name = max_context, name

    @classmethod
    def load(cls, path: str | Path, opts: LoadOptions | None = None,
             progress: Callable[[str, int], None] | None = None,
             experts: ExpertBackend | None = None) -> "Engine":
        opts = opts or LoadOptions()
        source = open_checkpoint(path)
        device = _pick_device(opts)
        dtype = _pick_dtype(opts, device, source)
        if opts.quantized_weights is None and device.type == "cuda":
            opts.quantized_weights = _dense_too_big_for_gpu(source, dtype, device)
        if experts is None:
            experts = build_experts(source, opts, device, dtype,
                                    (lambda n: progress("routed expert", n)) if progress else None)
        model = KimiK2Model(source, experts=experts, device=device, dtype=dtype, progress=progress,
                            quantized_linear=opts.quantized_weights)
        tokenizer, template = load_tokenizer_and_template(source)
        max_ctx = min(opts.max_context or 8192, source.config.max_position_embeddings)
        return cls(source, model, tokenizer, template, max_ctx, Path(path).name)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
                 add_generation_prompt: bool = True) -> list[int]:
        text = self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, allow_special=True)

    def new_generator(self) -> Generator:
        return Generator(self.model, self.max_context)

    @property
    def stop_ids(self) -> set[int]:
        return set(self.tokenizer.stop_ids)


def _dense_too_big_for_gpu(source: WeightSource, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the dequantized non-expert weights would take more than 60% of the GPU's free memory."""
    from k2local.linear import quantized_bytes_per_param  # noqa: PLC0415
    from offload.planner import non_expert_parts  # noqa: PLC0415

    if quantized_bytes_per_param(source, source.config) is None:
        return False
    dense = sum(non_expert_parts(source.config, torch.empty((), dtype=dtype).element_size()).values())
    return dense > 0.6 * torch.cuda.mem_get_info(device)[0]


def build_experts(source: WeightSource, opts: LoadOptions, device: torch.device, dtype: torch.dtype,
                  progress: Callable[[int], None] | None = None) -> ExpertBackend:
    """The routed-expert backend for these options (offload's planner); progress(nbytes) per expert loaded."""
    from offload.planner import build_backend  # noqa: PLC0415

    return build_backend(source, opts, device, dtype, progress=progress)


def load_tokenizer_and_template(source: WeightSource):
    """Tokenizer and chat template from the checkpoint directory (tiktoken.model, else tokenizer.json), or from GGUF
    metadata."""
    if hasattr(source, "tokenizer_and_template"):
        return source.tokenizer_and_template()
    from k2local.chat_template import ChatTemplate  # noqa: PLC0415
    from k2local.tokenizer import load_tokenizer  # noqa: PLC0415

    return load_tokenizer(source.path), ChatTemplate.from_dir(source.path)
