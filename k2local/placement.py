"""Placement: what k2local tells offload about a checkpoint, and the calls into offload's planner and backend.

offload knows where routed-expert bytes live and how they are computed, and nothing about Kimi K2. This module
hands it what it needs: the expert layout (which bytes of which file are each expert, found by the checkpoint's
tensor names), the footprint of everything else on the compute device (non-expert weights by kind, KV cache,
workspace), the device and dtype, the memory budgets and typed options, and the routers.
"""
from __future__ import annotations

import logging
import mmap
import os
import threading
from dataclasses import InitVar, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from k2local.weights.hf_checkpoint import SCALE_SUFFIX, SafetensorsSource, WeightSource, expert_name
from k2local.config import ModelConfig
from k2local.errors import CheckpointError
from k2local.linear import quantized_bytes_per_param
from k2local.weights.sanitize import q4_0_nbytes, repack_int4
from offload.backend import Routers, build_expert_backend
from offload.errors import ExpertReadError, PlanError
from offload.executor import OffloadExperts
from offload.expert_layout import PROJS, ExpertEntry, ExpertLayout, MatrixFormat, Segment
from offload.experts_dense import DenseExperts as _DenseExperts
from offload.options import Budgets, OffloadOptions
from offload.planner import GiB, MiB, Hardware, ModelFootprint, Plan, plan_placement, ram_reserve, stats_path
from offload.probe import probe_hardware
from offload.routing_stats import RoutingStats
from quant.types import QType

log = logging.getLogger("k2local")


# ---------------------------------------------------------------------------------------------- options
@dataclass
class LoadOptions:
    """How to place the model. The offload flags (gpu_mem, ram, experts_on) are the planner's budgets; `offload`
    holds the expert tiers' other knobs."""

    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # None: float32 on CPU for small models, bfloat16 otherwise
    max_context: int | None = None
    # with max_context None: the longest context the model supports whose KV cache fits the memory plan
    # (fitting_context; `k2local serve`), instead of 8192
    context_from_memory: bool = False
    cpu_only: bool = False
    gpu_mem: float | None = None  # GiB of VRAM to use
    ram: float | None = None  # GiB of RAM for experts
    experts_on: str | None = None  # "ram" | "disk" | None (planner decides)
    # keep non-expert GGUF weights block-quantized on the GPU (None: only when their bf16 copy would not fit)
    quantized_weights: bool | None = None
    offload: OffloadOptions = field(default_factory=OffloadOptions)
    # the knobs under their older string keys (OffloadOptions' field names; "experts_backend": "dense" for
    # dense=True), applied on top of `offload`; an unknown key is an error
    extra: InitVar[Mapping[str, Any] | None] = None

    def __post_init__(self, extra: Mapping[str, Any] | None) -> None:
        if extra:
            self.offload = offload_options(extra, self.offload)

    @property
    def budgets(self) -> Budgets:
        return Budgets(gpu_mem=self.gpu_mem, ram=self.ram, experts_on=self.experts_on)


_OFFLOAD_KEYS = frozenset(OffloadOptions.__dataclass_fields__) - {"dense"}


def offload_options(keys: Mapping[str, Any], base: OffloadOptions | None = None) -> OffloadOptions:
    """OffloadOptions from the older string-keyed form, on top of `base`."""
    out = replace(base) if base is not None else OffloadOptions()
    for k, v in keys.items():
        if k == "experts_backend":
            out.dense = v == "dense"
        elif k in _OFFLOAD_KEYS:
            setattr(out, k, v)
        else:
            raise ValueError(f"unknown offload option {k!r} (known: {', '.join(sorted(_OFFLOAD_KEYS))}, "
                             "experts_backend)")
    return out


def pick_device(opts: LoadOptions) -> torch.device:
    if opts.device:
        return torch.device(opts.device)
    if not opts.cpu_only and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(opts: LoadOptions, device: torch.device, source: WeightSource) -> torch.dtype:
    if opts.dtype:
        return getattr(torch, opts.dtype)
    cfg = source.config
    small = cfg.hidden_size * cfg.num_hidden_layers < 50_000
    return torch.float32 if device.type == "cpu" and small else torch.bfloat16


def _pick(opts: LoadOptions, source: WeightSource, device: torch.device | None, dtype: torch.dtype | None
          ) -> tuple[torch.device, torch.dtype]:
    """The device and dtype for a plan (the rules Engine.load uses), refusing --cpu-only with a GPU device."""
    dev = device if device is not None else pick_device(opts)
    if opts.cpu_only and dev.type != "cpu":
        raise PlanError(f"--cpu-only conflicts with device {dev}")
    return dev, (dtype if dtype is not None else pick_dtype(opts, dev, source))


# ---------------------------------------------------------------------------------------------- sizes
def non_expert_parts(cfg: ModelConfig, dtype_bytes: int, weight_bytes: float | None = None) -> dict[str, int]:
    """Bytes of everything the model keeps on its compute device, by kind (router in float32).
    weight_bytes: bytes per weight of matrices kept block-quantized (attention, shared, dense, head)."""
    wb = dtype_bytes if weight_bytes is None else weight_bytes
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    attn = norms = dense = router = shared = 0
    for i in range(cfg.num_hidden_layers):
        norms += 2 * h
        if cfg.q_lora_rank:
            attn += h * cfg.q_lora_rank + cfg.q_lora_rank * nh * cfg.qk_head_dim
            norms += cfg.q_lora_rank
        else:
            attn += h * nh * cfg.qk_head_dim
        attn += h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * nh * (
            cfg.qk_nope_head_dim + cfg.v_head_dim) + nh * cfg.v_head_dim * h
        norms += cfg.kv_lora_rank
        if cfg.is_moe_layer(i):
            router += cfg.n_routed_experts * (h + 1)
            shared += 3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts
        else:
            dense += 3 * h * cfg.intermediate_size
    embed = cfg.vocab_size * h * dtype_bytes
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h * wb
    return {"attention": int(attn * wb), "shared experts": int(shared * wb),
            "dense FFN layers": int(dense * wb), "norms": (norms + h) * dtype_bytes,
            "router (fp32)": router * 4, "embeddings + head": int(embed + head)}


def kv_cache_tokens(max_context: int) -> int:
    """The model's KV cache starts at 256 positions and doubles: the capacity reached for max_context."""
    cap = 256
    while cap < max_context:
        cap *= 2
    return cap


KV_SHARE = 4  # fitting_context: the KV cache may take 1/KV_SHARE of the memory the non-expert parts leave
MIN_FITTING_CONTEXT = 256


def kv_bytes_per_token(cfg: ModelConfig, dtype_bytes: int) -> int:
    """One position of the compressed (MLA) KV cache over all layers."""
    return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes


def fitting_context(source: WeightSource, opts: LoadOptions, device: torch.device, dtype: torch.dtype,
                    hw: Hardware | None = None) -> int:
    """The default context of a server: min(the model's max_position_embeddings, what the KV budget allows).

    The KV budget is 1/KV_SHARE of the compute device's memory (VRAM: --gpu-mem or what is free less 0.5 GiB;
    CPU: available RAM less the planner's reserve) after the non-expert weights and the workspace, so the rest is
    left to routed experts. The cache grows by doubling (kv_cache_tokens), so the window is a power of two."""
    cfg: ModelConfig = source.config
    hw = hw or probe_hardware(device)
    db = torch.empty((), dtype=dtype).element_size()
    base = footprint(source, replace(opts, max_context=MIN_FITTING_CONTEXT), device, dtype)
    if device.type == "cuda":
        mem = int(opts.gpu_mem * GiB) if opts.gpu_mem else hw.vram_free - GiB // 2
    else:
        mem = hw.ram_available - ram_reserve(hw)
    budget = (mem - base.resident_bytes - base.workspace_bytes) // KV_SHARE
    per_tok = kv_bytes_per_token(cfg, db)
    cap = MIN_FITTING_CONTEXT
    while cap * 2 * per_tok <= budget:
        cap *= 2
    return min(cfg.max_position_embeddings, cap)


def workspace_bytes(cfg: ModelConfig, dtype_bytes: int, chunk: int = 512) -> int:
    """Activations of one prefill chunk (the generator's default), generously."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    per_tok = 16 * h + 4 * nh * (cfg.qk_head_dim + cfg.v_head_dim) + 3 * cfg.moe_intermediate_size * \
        cfg.num_experts_per_tok + 2 * cfg.intermediate_size
    return chunk * per_tok * max(dtype_bytes, 4) + 2 * nh * chunk * chunk * 4 + 8 * cfg.vocab_size + 64 * MiB


def model_id(source: WeightSource) -> str:
    """Names the model's routing statistics file: checkpoint name, layers and experts."""
    cfg = source.config
    return f"{Path(str(source.path)).name}-{cfg.num_hidden_layers}L-{cfg.n_routed_experts}E"


def footprint(source: WeightSource, opts: LoadOptions, device: torch.device, dtype: torch.dtype
              ) -> ModelFootprint:
    """Everything but the routed experts on `device` at `dtype` for `opts`, as the planner needs it."""
    cfg: ModelConfig = source.config
    db = torch.empty((), dtype=dtype).element_size()
    quantized = opts.quantized_weights
    if quantized is None:  # the CPU keeps big GGUF matrices block-quantized by default (k2local.linear)
        quantized = device.type == "cpu"
    wbytes = quantized_bytes_per_param(source, cfg) if quantized else None
    parts = non_expert_parts(cfg, db, wbytes)
    resident = sum(parts.values())
    max_ctx = min(opts.max_context or 8192, cfg.max_position_embeddings)
    kv_tok = kv_cache_tokens(max_ctx)
    embed_rows = cfg.vocab_size * cfg.hidden_size * db
    return ModelFootprint(
        name=str(source.path), model_id=model_id(source), resident_parts=parts,
        kv_bytes=kv_bytes_per_token(cfg, db) * kv_tok,
        kv_tokens=kv_tok, max_context=max_ctx, workspace_bytes=workspace_bytes(cfg, db),
        non_expert_read_per_token=max(0, resident - embed_rows // (1 if cfg.tie_word_embeddings else 2)),
        n_layers=cfg.num_hidden_layers, top_k=cfg.num_experts_per_tok)


def dense_too_big_for_gpu(source: WeightSource, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the dequantized non-expert weights would take more than 60% of the GPU's free memory."""
    if quantized_bytes_per_param(source, source.config) is None:
        return False
    dense = sum(non_expert_parts(source.config, torch.empty((), dtype=dtype).element_size()).values())
    return dense > 0.6 * torch.cuda.mem_get_info(device)[0]


def routers(source: WeightSource, moe_layers: list[int]) -> Routers:
    """Each MoE layer's router weight (bf16) and score-correction bias (fp32, when the checkpoint has one)."""
    out: Routers = {}
    for layer in moe_layers:
        m = f"model.layers.{layer}.mlp."
        b = m + "gate.e_score_correction_bias"
        out[layer] = (source.get(m + "gate.weight", torch.bfloat16),
                      source.get(b, torch.float32) if source.has(b) else None)
    return out


def source_notes(source: WeightSource) -> list[str]:
    """What the user should know about how this checkpoint runs (plan notes, a log line at load)."""
    cfg = source.config
    out = []
    if cfg.multimodal is not None:
        left = getattr(source, "other_tensors", 0)
        out.append(f"{cfg.multimodal} is a multimodal checkpoint: k2local runs its text model only; images are not "
                   f"supported" + (f" ({left} vision/projector tensors left out)" if left else ""))
    if cfg.is_int4:
        out.append("routed experts are INT4 (compressed-tensors, group 32): repacked to Q4_0 as they are read, "
                   "the same 4-bit codes")
    return out


# ---------------------------------------------------------------------------------------------- planning
def make_plan(source: WeightSource, opts: LoadOptions, device: torch.device | None = None,
              dtype: torch.dtype | None = None, hw: Hardware | None = None, stats: RoutingStats | None = None,
              layout: ExpertLayout | None = None) -> Plan:
    """Place the model for `opts`; PlanError with what to change when it cannot fit."""
    device, dtype = _pick(opts, source, device, dtype)
    hw = hw or probe_hardware(device)
    layout = layout or layout_for(source)
    model = footprint(source, opts, device, dtype)
    if stats is None:
        stats = RoutingStats.load_or_new(stats_path(opts.offload, model.model_id), model.n_layers, layout.n_experts)
    plan = plan_placement(model, layout, device, dtype, hw, stats, opts.budgets, opts.offload)
    plan.notes[:0] = source_notes(source)
    return plan


class DenseExperts(_DenseExperts):
    """offload's all-in-memory reference backend, loaded from a checkpoint by its routed experts' tensor names."""

    @classmethod
    def from_source(cls, source: WeightSource, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None
                    ) -> "DenseExperts":
        """Load every routed expert; progress(nbytes) after each one."""
        cfg = source.config
        names = {layer: [tuple(expert_name(layer, e, p) for p in PROJS) for e in range(cfg.n_routed_experts)]
                 for layer in range(cfg.num_hidden_layers) if cfg.is_moe_layer(layer)}
        return cls.load(names, source.get, dtype=dtype, device=device, progress=progress)  # type: ignore[arg-type]


def build_backend(source: WeightSource, opts: LoadOptions, device: torch.device, dtype: torch.dtype,
                  plan: Plan | None = None, progress: Callable[[int], None] | None = None
                  ) -> OffloadExperts | DenseExperts:
    """The routed-expert backend for `opts`: plan (or refuse), then set up the tiers (offload.backend); or, with
    `opts.offload.dense`, every expert dequantized in memory. progress(nbytes) per routed expert loaded up front."""
    if opts.offload.dense:
        return DenseExperts.from_source(source, dtype=dtype, device=device, progress=progress)
    layout = layout_for(source)
    if plan is None:
        _pick(opts, source, device, dtype)  # the --cpu-only check make_plan makes
    return build_expert_backend(layout, footprint(source, opts, device, dtype), device, dtype, opts.budgets,
                                opts.offload, plan=plan, routers=lambda: routers(source, layout.moe_layers),
                                scoring=source.config.scoring_func, progress=progress)


# ---------------------------------------------------------------------------------------------- expert layout
_ST_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F8_E4M3": (torch.float8_e4m3fn, 1), "BF16": (torch.bfloat16, 2), "F16": (torch.float16, 2),
    "F32": (torch.float32, 4),
}  # the dtypes a routed expert (or its FP8 scale) may be stored in


class Int4Repack:
    """Reads one INT4 (compressed-tensors) expert matrix from its shard and writes it as Q4_0 bytes: a Segment's
    `fill` (offload's RAM and disk tiers and the GPU cache read it like any expert; no dequantized copy is made).
    Scales that are not fp16 values are rounded per block (see sanitize.repack_int4) and counted in
    `INT4_STATS`; a scale past fp16's range fails the read with a one-line error."""

    _fds: dict[str, int] = {}
    _lock = threading.Lock()

    def __init__(self, name: str, packed: Any, scale: Any):
        self.name, self.packed, self.scale = name, packed, scale
        self.rows, self.cols = packed.shape[0], packed.shape[1] * 8

    @classmethod
    def _fd(cls, path: str) -> int:
        with cls._lock:
            fd = cls._fds.get(path)
            if fd is None:
                try:
                    fd = cls._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise ExpertReadError(f"{path}: cannot open expert file ({e.strerror})") from None
            return fd

    @staticmethod
    def _pread(info: Any) -> bytearray:
        path = str(info.file)
        fd, buf, got = Int4Repack._fd(path), bytearray(info.nbytes), 0
        view = memoryview(buf)
        while got < info.nbytes:
            try:
                n = os.preadv(fd, [view[got:]], info.offset + got)
            except OSError as e:
                raise ExpertReadError(f"{path}: read failed at {info.offset + got} ({e.strerror})") from None
            if n <= 0:
                raise ExpertReadError(f"{path}: truncated (expert bytes end past the end of the file)")
            got += n
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)  # as the disk tier does
        return buf

    def __call__(self, out: memoryview) -> None:
        packed = torch.frombuffer(self._pread(self.packed), dtype=torch.int32).view(self.rows, self.cols // 8)
        sdt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[self.scale.dtype]
        scale = torch.frombuffer(self._pread(self.scale), dtype=sdt).view(self.rows, -1)
        try:
            _, inexact = repack_int4(packed, scale, out=torch.frombuffer(out, dtype=torch.uint8))
        except ValueError as e:
            raise ExpertReadError(f"{self.packed.file}: {self.name}: {e}") from None
        if inexact:
            INT4_STATS.note(self.name, inexact)


class Int4Stats:
    """Blocks whose bf16 scale was not an fp16 value (rounded to the nearest one when repacked to Q4_0)."""

    def __init__(self) -> None:
        self.blocks = 0
        self.matrices: set[str] = set()
        self._lock = threading.Lock()

    def note(self, name: str, blocks: int) -> None:
        with self._lock:
            first = not self.matrices
            self.blocks += blocks
            self.matrices.add(name)
        if first:
            log.warning("%s: %d block scale(s) of this INT4 expert are not fp16 values (below 2^-17): rounded to the "
                        "nearest fp16 in Q4_0 (weights off by < 2^-21); later ones are counted in "
                        "k2local.placement.INT4_STATS", name, blocks)


INT4_STATS = Int4Stats()


def layout_from_safetensors(source: SafetensorsSource) -> ExpertLayout:
    """Expert segments of a Hugging Face checkpoint (FP8 + scale_inv, or BF16/F16/F32), from the shard headers.
    INT4 (compressed-tensors) experts appear as ggml Q4_0 matrices whose bytes are repacked as they are read."""
    cfg = source.config

    def locate(name: str) -> tuple[Segment, str, tuple[int, ...]]:
        if name not in source.weight_map:
            raise CheckpointError(f"{source.path}: tensor {name} not in checkpoint")
        info = source.tensor_location(name)
        return Segment(str(info.file), info.offset, info.nbytes), info.dtype, tuple(info.shape)

    block = tuple(getattr(source, "block", (128, 128)))
    entries: dict[int, list[ExpertEntry]] = {}
    for layer in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(layer):
            continue
        row = []
        for e in range(cfg.n_routed_experts):
            segs: list[Segment] = []
            fmts: list[MatrixFormat] = []
            for p in PROJS:
                name = expert_name(layer, e, p)
                parts = source.int4_parts(name) if source.is_int4 else None
                if parts is not None:
                    rows, cols = parts[0].shape[0], parts[0].shape[1] * 8
                    segs.append(Segment(None, 0, q4_0_nbytes(rows, cols), fill=Int4Repack(name, *parts),
                                        origin=str(parts[0].file)))
                    fmts.append(MatrixFormat("ggml", rows, cols, qtype=int(QType.Q4_0)))
                    continue
                seg, dt, shape = locate(name)
                if dt not in _ST_DTYPES or len(shape) != 2:
                    raise CheckpointError(f"{source.path}: {name}: unsupported expert dtype/shape {dt} {shape}")
                segs.append(seg)
                if dt == "F8_E4M3":
                    sseg, sdt, _ = locate(name + SCALE_SUFFIX)
                    segs.append(sseg)
                    fmts.append(MatrixFormat("fp8", shape[0], shape[1], dtype=_ST_DTYPES[sdt][0],
                                             block=block))  # type: ignore[arg-type]
                else:
                    fmts.append(MatrixFormat("float", shape[0], shape[1], dtype=_ST_DTYPES[dt][0]))
            row.append(ExpertEntry(tuple(segs), tuple(fmts)))  # type: ignore[arg-type]
        entries[layer] = row
    return ExpertLayout(entries, cfg.n_routed_experts, "safetensors")


def _memmap_file_offset(arr: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset of arr[0]) for an np.memmap or a view of one; None for in-memory arrays."""
    mm = getattr(arr, "_mmap", None)
    fname = getattr(arr, "filename", None)
    if mm is None or fname is None:
        return None
    base_addr = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    off = int(getattr(arr, "offset", 0) or 0)
    map_start = off - off % mmap.ALLOCATIONGRANULARITY
    return str(fname), map_start + (arr.ctypes.data - base_addr)


@runtime_checkable
class StackedExpertSource(Protocol):
    """A source whose routed experts are stacked per layer and projection (a GGUF), handed out without a copy."""

    def expert_tensor(self, layer: int, proj: str) -> tuple[np.ndarray, int, int, int]: ...


def layout_from_gguf(source: Any) -> ExpertLayout:
    """Expert slices of stacked GGUF expert tensors via `source.expert_tensor(layer, proj)` (zero-copy memmaps)."""
    cfg = source.config
    entries: dict[int, list[ExpertEntry]] = {}
    for layer in range(cfg.num_hidden_layers):
        if not cfg.is_moe_layer(layer):
            continue
        per_proj = []
        for p in PROJS:
            data, qtype, rows, cols = source.expert_tensor(layer, p)
            if data.ndim != 3 or data.shape[0] != cfg.n_routed_experts or data.shape[1] != rows:
                raise CheckpointError(f"{source.path}: layer {layer} {p} experts: unexpected shape {data.shape}")
            loc = _memmap_file_offset(data)
            fmt = (MatrixFormat("float", rows, cols, dtype={0: torch.float32, 1: torch.float16, 30: torch.bfloat16}
                                [int(qtype)]) if int(qtype) in (0, 1, 30) else
                   MatrixFormat("ggml", rows, cols, qtype=int(qtype)))
            per_proj.append((data, loc, fmt))
        row = []
        for e in range(cfg.n_routed_experts):
            segs, fmts = [], []
            for data, loc, fmt in per_proj:
                n = data.shape[1] * data.shape[2]
                contiguous = data.strides[2] == 1 and data.strides[1] == data.shape[2]
                if loc is not None and contiguous:
                    segs.append(Segment(loc[0], loc[1] + e * data.strides[0], n))
                else:
                    segs.append(Segment(None, 0, n, array=np.ascontiguousarray(data[e]).reshape(-1)))
                fmts.append(fmt)
            row.append(ExpertEntry(tuple(segs), tuple(fmts)))  # type: ignore[arg-type]
        entries[layer] = row
    return ExpertLayout(entries, cfg.n_routed_experts, "gguf")


def layout_for(source: WeightSource) -> ExpertLayout:
    """The layout of any supported source (GGUF with stacked experts, or a safetensors checkpoint)."""
    if isinstance(source, StackedExpertSource):
        return layout_from_gguf(source)
    if isinstance(source, SafetensorsSource):
        return layout_from_safetensors(source)
    raise CheckpointError(f"{getattr(source, 'path', source)}: this source cannot stream experts "
                          "(needs a safetensors checkpoint or a GGUF)")
