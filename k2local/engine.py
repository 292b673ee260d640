"""Engine: a loaded model with its tokenizer and chat template; what the CLI and the server drive."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from k2local.chat.template import ChatTemplate
from k2local.weights.hf_checkpoint import WeightSource, open_checkpoint
from k2local.generate import Generator
from k2local.model import ExpertBackend, KimiK2Model
from k2local.placement import (LoadOptions, build_backend, dense_too_big_for_gpu, fitting_context, pick_device,
                               pick_dtype, source_notes)
from k2local.tokenizer.tiktoken_bpe import load_tokenizer

log = logging.getLogger("k2local")
__all__ = ["Engine", "LoadOptions", "build_experts", "load_tokenizer_and_template"]


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
        if source.config.multimodal is not None:
            log.warning(source_notes(source)[0])
        device = pick_device(opts)
        dtype = pick_dtype(opts, device, source)
        if opts.quantized_weights is None and device.type == "cuda":
            opts.quantized_weights = dense_too_big_for_gpu(source, dtype, device)
        if opts.max_context is None and opts.context_from_memory:
            opts.max_context = fitting_context(source, opts, device, dtype)
        if experts is None:
            experts = build_experts(source, opts, device, dtype,
                                    (lambda n: progress("routed expert", n)) if progress else None)
        model = KimiK2Model(source, experts=experts, device=device, dtype=dtype, progress=progress,
                            quantized_linear=opts.quantized_weights)
        tokenizer, template = load_tokenizer_and_template(source)
        max_ctx = min(opts.max_context or 8192, source.config.max_position_embeddings)
        return cls(source, model, tokenizer, template, max_ctx, Path(path).name)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
                 add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        """Render through the chat template (``template_kwargs`` become template variables, e.g. ``thinking``)
        and tokenize."""
        text = self.template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                    **template_kwargs)
        return self.tokenizer.encode(text, allow_special=True)

    def new_generator(self) -> Generator:
        return Generator(self.model, self.max_context)

    @property
    def stop_ids(self) -> set[int]:
        return set(self.tokenizer.stop_ids)


def build_experts(source: WeightSource, opts: LoadOptions, device: torch.device, dtype: torch.dtype,
                  progress: Callable[[int], None] | None = None) -> ExpertBackend:
    """The routed-expert backend for these options (offload's planner); progress(nbytes) per expert loaded."""
    return build_backend(source, opts, device, dtype, progress=progress)


@runtime_checkable
class CarriesTokenizer(Protocol):
    """A source that carries its own tokenizer and chat template (a GGUF, in its metadata)."""

    def tokenizer_and_template(self) -> tuple[Any, ChatTemplate]: ...


def load_tokenizer_and_template(source: WeightSource):
    """Tokenizer and chat template from the checkpoint directory (tiktoken.model, else tokenizer.json), or from GGUF
    metadata."""
    if isinstance(source, CarriesTokenizer):
        return source.tokenizer_and_template()
    return load_tokenizer(source.path), ChatTemplate.from_dir(source.path)
