"""Hugging Face Kimi K2 / DeepSeek-V3 checkpoint (FP8, BF16 or INT4 safetensors) -> GGUF (arch `deepseek2`).

Writes what llama.cpp's own converter writes: its metadata keys, `kv_b_proj` split into `attn_k_b`/`attn_v_b`, routed
experts stacked into `ffn_*_exps`, the router bias as `exp_probs_b.bias`, sigmoid gating, YaRN keys, a gpt2-style
vocabulary (from `tiktoken.model`, pre `kimi-k2`, or a DeepSeek-V3 `tokenizer.json`, pre `deepseek-v3`) and the
chat template. Each tensor gets the type its recipe picks (k2local.convert.recipes); INT4 (compressed-tensors)
routed experts going to Q4_0 keep their 4-bit codes (repacked, not re-rounded), every other target dequantizes them. Streams row chunks (experts in row
chunks too), so peak memory stays bounded whatever the model size; the output is resumable and atomic
(quant.gguf_file.GGUFStreamWriter).
"""
from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from gguf import Keys

from k2local import arch
from k2local.weights.hf_checkpoint import WeightSource, open_checkpoint
from k2local.config import RANDOM_WEIGHTS_KEY, ModelConfig
from k2local.errors import CheckpointError, K2Error
from k2local.tokenizer.gguf_vocab import tokenizer_metadata
from k2local.convert.imatrix import IMatrix
from k2local.convert.recipes import RECIPES, Recipe, TensorRole, get_recipe, resolve_type
from k2local.weights import sanitize
from quant.gguf_file import (GGUFFormatError, GGUFStreamWriter, MetaValue, TensorSpec, boolv, can_quantize,
                             f32v, qtype_of, quantize_rows, strv, tensor_nbytes, u32)

ARCH = arch.ARCH_NAME
CONVERTER_VERSION = 1  # bump when produced bytes change for the same inputs (invalidates resume state)
CHUNK_WEIGHTS = 1 << 22  # values per streamed chunk (16 MB of float32): bounds peak memory, whatever the model
GATING_FUNC = {"softmax": 1, "sigmoid": 2}
ProgressFn = Callable[[str, int], None]  # (tensor name, weights just processed)


# ------------------------------------------------------------------------------------------------------ tensor plan
@dataclass(frozen=True)
class PlannedTensor:
    """One GGUF tensor: its role, torch-order shape and how it is built from HF tensors."""

    role: TensorRole
    shape: tuple[int, ...]
    build: str  # "plain" | "experts" | "k_b" | "v_b"
    hf: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.role.name

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def plan_tensors(cfg: ModelConfig) -> list[PlannedTensor]:
    """Every GGUF tensor of `cfg` in llama.cpp's names and shapes (torch order: [n_expert|heads,] rows, cols)."""
    L = cfg.num_hidden_layers
    first_moe = next((i for i in range(L) if cfg.is_moe_layer(i)), L)
    return [PlannedTensor(TensorRole(t.name, t.kind, t.layer, L, first_moe, t.shape[-1]), t.shape, t.build.value,
                          t.hf) for t in arch.gguf_tensors(cfg)]


def tensor_types(plan: list[PlannedTensor], recipe: Recipe) -> list[str]:
    """The ggml type name of each planned tensor under `recipe`."""
    return [resolve_type(recipe, p.role, _can_encode) for p in plan]


def _can_encode(t: str, cols: int) -> bool:
    return can_quantize(qtype_of(t), cols)


def projected_size(cfg: ModelConfig, recipe: Recipe) -> tuple[int, float]:
    """(bytes of tensor data, bits per weight) that `recipe` gives for `cfg`."""
    plan = plan_tensors(cfg)
    types = [resolve_type(recipe, p.role) for p in plan]
    total = sum(tensor_nbytes(p.shape, qtype_of(t)) for p, t in zip(plan, types))
    n = sum(p.numel for p in plan)
    return total, 8.0 * total / n


# -------------------------------------------------------------------------------------------------------- metadata
def model_metadata(cfg: ModelConfig, name: str, file_type: int) -> dict[str, MetaValue]:
    """The general.* and deepseek2.* keys llama.cpp reads, from a ModelConfig."""
    a = ARCH
    nope, rope, vd, kvr = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank

    def k(key: str) -> str:
        return key.format(arch=a)

    md: dict[str, MetaValue] = {
        Keys.General.ARCHITECTURE: strv(a),
        Keys.General.NAME: strv(name),
        Keys.General.FILE_TYPE: u32(file_type),
        Keys.General.QUANTIZATION_VERSION: u32(2),
        k(Keys.LLM.VOCAB_SIZE): u32(cfg.vocab_size),
        k(Keys.LLM.CONTEXT_LENGTH): u32(cfg.max_position_embeddings),
        k(Keys.LLM.EMBEDDING_LENGTH): u32(cfg.hidden_size),
        k(Keys.LLM.BLOCK_COUNT): u32(cfg.num_hidden_layers),
        k(Keys.LLM.FEED_FORWARD_LENGTH): u32(cfg.intermediate_size),
        k(Keys.Attention.HEAD_COUNT): u32(cfg.num_attention_heads),
        k(Keys.Attention.HEAD_COUNT_KV): u32(1),  # MLA runs as MQA over the latent
        k(Keys.Rope.FREQ_BASE): f32v(cfg.rope_theta),
        k(Keys.Attention.LAYERNORM_RMS_EPS): f32v(cfg.rms_norm_eps),
        k(Keys.LLM.EXPERT_COUNT): u32(cfg.n_routed_experts),
        k(Keys.LLM.EXPERT_USED_COUNT): u32(cfg.num_experts_per_tok),
        k(Keys.LLM.EXPERT_GROUP_COUNT): u32(cfg.n_group),
        k(Keys.LLM.EXPERT_GROUP_USED_COUNT): u32(cfg.topk_group),
        k(Keys.LLM.EXPERT_GATING_FUNC): u32(GATING_FUNC[cfg.scoring_func]),
        k(Keys.LLM.LEADING_DENSE_BLOCK_COUNT): u32(cfg.first_k_dense_replace),
        k(Keys.Attention.KV_LORA_RANK): u32(kvr),
        k(Keys.Attention.KEY_LENGTH): u32(kvr + rope),
        k(Keys.Attention.VALUE_LENGTH): u32(kvr),
        k(Keys.Attention.KEY_LENGTH_MLA): u32(nope + rope),
        k(Keys.Attention.VALUE_LENGTH_MLA): u32(vd),
        k(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH): u32(cfg.moe_intermediate_size),
        k(Keys.LLM.EXPERT_SHARED_COUNT): u32(cfg.n_shared_experts),
        k(Keys.LLM.EXPERT_WEIGHTS_SCALE): f32v(cfg.routed_scaling_factor),
        k(Keys.Rope.DIMENSION_COUNT): u32(rope),
    }
    if cfg.q_lora_rank is not None:
        md[k(Keys.Attention.Q_LORA_RANK)] = u32(cfg.q_lora_rank)
    if cfg.norm_topk_prob:
        md[k(Keys.LLM.EXPERT_WEIGHTS_NORM)] = boolv(True)
    rs = cfg.rope_scaling or {}
    if rs.get("type", rs.get("rope_type")) == "yarn":
        factor = float(rs.get("factor") or cfg.max_position_embeddings / rs["original_max_position_embeddings"])
        md[k(Keys.Rope.SCALING_TYPE)] = strv("yarn")
        md[k(Keys.Rope.SCALING_FACTOR)] = f32v(factor)
        md[k(Keys.Rope.SCALING_ORIG_CTX_LEN)] = u32(int(rs["original_max_position_embeddings"]))
        md[k(Keys.Rope.SCALING_YARN_BETA_FAST)] = f32v(float(rs.get("beta_fast") or 32))
        md[k(Keys.Rope.SCALING_YARN_BETA_SLOW)] = f32v(float(rs.get("beta_slow") or 1))
        # llama.cpp's converter stores 0.1 * mscale_all_dim and its loader divides by 0.1 again
        md[k(Keys.Rope.SCALING_YARN_LOG_MUL)] = f32v(0.1 * float(rs.get("mscale_all_dim") or 0.0))
    return md


# ------------------------------------------------------------------------------------------------- reading sources
class RowReader:
    """Float32 row ranges of source tensors; sources with `get_rows` read only the needed rows."""

    def __init__(self, src: WeightSource):
        self.src = src

    def shape(self, name: str) -> tuple[int, ...]:
        if hasattr(self.src, "shape"):
            return tuple(self.src.shape(name))  # type: ignore[attr-defined]
        return tuple(self.src.get(name).shape)

    def full(self, name: str) -> torch.Tensor:
        return self.src.get(name, torch.float32)

    def rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        if hasattr(self.src, "get_rows"):
            return self.src.get_rows(name, r0, r1)  # type: ignore[attr-defined]
        return self.src.get(name, torch.float32)[r0:r1]


def _chunks(p: PlannedTensor, reader: RowReader, start_row: int) -> Iterator[torch.Tensor]:
    """Float32 row chunks [n, cols] of planned tensor `p` from global row `start_row` to the end."""
    cols = p.shape[-1]
    rows_total = int(np.prod(p.shape[:-1])) if len(p.shape) > 1 else 1
    if len(p.shape) == 1:
        yield reader.full(p.hf[0]).reshape(1, -1).float()
        return
    if p.build == "experts":  # one expert after the other, each in row chunks
        per = p.shape[1]
        for e, r0 in sanitize.stacked_experts(p.shape[0], per, start_row):
            shape = reader.shape(p.hf[e])
            if tuple(shape) != p.shape[1:]:
                raise CheckpointError(f"{reader.src.path}: {p.hf[e]} has shape {tuple(shape)}, "
                                      f"expected {p.shape[1:]}")
            yield from _row_chunks(reader, p.hf[e], r0, per, cols)
        return
    if p.build in ("k_b", "v_b"):
        nh, kvr = p.shape[0], (p.shape[1] if p.build == "k_b" else p.shape[2])
        kv = reader.full(p.hf[0]).float()
        per_head = kv.shape[0] // nh if kv.dim() == 2 else 0
        if kv.dim() != 2 or kv.shape[1] != kvr or per_head * nh != kv.shape[0]:
            raise CheckpointError(f"{reader.src.path}: {p.hf[0]} has shape {tuple(kv.shape)}, expected "
                                  f"[{nh} * (nope + v), {kvr}]")
        nope = p.shape[2] if p.build == "k_b" else per_head - p.shape[1]
        k_b, v_b = sanitize.split_kv_b(kv, nh, nope)  # [heads, kv_lora, nope], [heads, v, kv_lora]
        yield (k_b if p.build == "k_b" else v_b).reshape(-1, cols)[start_row:]
        return
    shape = reader.shape(p.hf[0])
    if tuple(shape) != p.shape:
        raise CheckpointError(f"{reader.src.path}: {p.hf[0]} has shape {tuple(shape)}, expected {p.shape}")
    yield from _row_chunks(reader, p.hf[0], start_row, rows_total, cols)


def _row_chunks(reader: RowReader, name: str, r: int, rows: int, cols: int) -> Iterator[torch.Tensor]:
    """Rows r..rows of 2-D source tensor `name` in chunks of about CHUNK_WEIGHTS values (multiples of 128 rows,
    the FP8 scale block, so no scale row is read twice)."""
    step = max(128, CHUNK_WEIGHTS // cols // 128 * 128)
    while r < rows:
        r1 = min(rows, (r // step + 1) * step)
        yield reader.rows(name, r, r1)
        r = r1


# ------------------------------------------------------------------------------------------------------ conversion
@dataclass
class ConvertResult:
    paths: list[Path]
    resumed_bytes: int
    total_bytes: int
    types: dict[str, int]  # ggml type name -> number of tensors
    # INT4 -> Q4_0 blocks whose bf16 scale was not an fp16 value (rounded to the nearest; 0 = the copy is exact)
    int4_inexact_blocks: int = 0


def source_fingerprint(src: WeightSource) -> str:
    """Identity of the input files (names, sizes, mtimes) for resume checks."""
    p = Path(src.path)
    files = sorted(p.glob("*")) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def parse_size(text: str | int | None) -> int:
    """'50G', '1.5T', '300M', '0' -> bytes (0 = no limit)."""
    if text is None:
        return 0
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise K2Error(f"bad size {text!r}; use e.g. 50G, 500M or 0 for no limit") from None


def convert(src_path: str | Path, out: str | Path, recipe: str | Recipe = "q4", imatrix: str | Path | None = None,
            split_max_bytes: int = 0, name: str | None = None, progress: ProgressFn | None = None,
            on_start: Callable[[int, int], None] | None = None, device: str | None = None) -> ConvertResult:
    """Convert the checkpoint at `src_path` into GGUF `out` (split when over `split_max_bytes`).

    `progress(name, n_weights)` is called as weights are written; `on_start(total_weights, resumed_weights)` once
    before. Rerunning after an interruption resumes where the last run stopped (same inputs and options).
    `device` ("cpu", "cuda"; default: cpu) is where the quantizer runs; the bytes are the same either way.
    """
    rec = get_recipe(recipe) if isinstance(recipe, str) else recipe
    src_path, out = Path(src_path), Path(out)
    if out.suffix != ".gguf":
        raise K2Error(f"{out}: the output name must end in .gguf")
    if not out.parent.exists():
        raise K2Error(f"{out.parent}: output directory does not exist")
    src = open_checkpoint(src_path)
    if hasattr(src, "drop_cache"):
        src.drop_cache = True  # one pass over the input: do not let it fill the page cache
    if not Path(src.path).is_dir():
        raise CheckpointError(f"{src_path}: quantize reads a Hugging Face checkpoint directory (safetensors); "
                              "to requantize a GGUF use llama-quantize")
    cfg = src.config
    imat = None
    if imatrix is not None:
        imat = IMatrix.load(imatrix)
    plan = plan_tensors(cfg)
    types = tensor_types(plan, rec)
    _check_imatrix(imat, plan, imatrix)
    metadata = model_metadata(cfg, name or src_path.name, rec.file_type)
    metadata.update(tokenizer_metadata(src_path, cfg))
    if cfg.random_weights:  # a make-tiny checkpoint: its GGUF says so too
        metadata[RANDOM_WEIGHTS_KEY] = u32(int(cfg.extra["k2local_tiny"]))
    specs = [TensorSpec(p.name, p.shape, int(qtype_of(t))) for p, t in zip(plan, types)]
    extra = json.dumps({"v": CONVERTER_VERSION, "recipe": rec.name, "src": source_fingerprint(src),
                        "imatrix": imat.fingerprint() if imat else None}, sort_keys=True)
    if split_max_bytes > 0 and specs:
        big = max(specs, key=lambda t: t.nbytes)
        if big.nbytes > split_max_bytes:
            raise K2Error(f"--split-max-size {human_bytes(split_max_bytes)} is smaller than the largest tensor ({big.name}, "
                          f"{human_bytes(big.nbytes)}); give at least {human_bytes(big.nbytes)}, or 0 for one file")
    try:
        writer = GGUFStreamWriter(out, metadata, specs, split_max_bytes=split_max_bytes, fingerprint_extra=extra)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        stem = out.name.removesuffix(".gguf")
        for p in [*out.parent.glob(f"{stem}*.gguf.partial"), *out.parent.glob(f"{stem}*.gguf.resume.json*")]:
            p.unlink(missing_ok=True)
        raise K2Error(f"{out.parent}: no space left on device; free some space and rerun") from None
    try:
        _check_disk(out, writer.bytes_total - writer.resumed_bytes)
    except K2Error:
        if not writer.resumed_bytes:
            writer.discard()
        raise
    by_name = {p.name: p for p in plan}
    weights_total = sum(p.numel for p in plan)
    resumed_weights = sum(by_name[t.name].numel for t in writer.tensors[: writer.current_index])
    reader = RowReader(src)
    int4_inexact = 0
    dev = torch.device(device) if device and device != "cpu" else None
    if on_start:
        on_start(weights_total, resumed_weights)
    try:
        with writer:
            for spec, done in writer.remaining():
                p = by_name[spec.name]
                start_row = done // spec.row_bytes
                if start_row and progress:
                    progress(spec.name, start_row * spec.cols)
                row = start_row
                if _copies_int4(p, spec, src):  # INT4 experts -> Q4_0: the same codes, repacked
                    for e, r0 in sanitize.stacked_experts(p.shape[0], p.shape[1], start_row):
                        r = r0
                        while r < p.shape[1]:
                            r1 = min(p.shape[1], r + max(1, CHUNK_WEIGHTS // spec.cols))
                            q, inexact = src.q4_0_rows(p.hf[e], r, r1)  # type: ignore[attr-defined]
                            int4_inexact += inexact
                            writer.write(q.numpy())
                            if progress:
                                progress(spec.name, (r1 - r) * spec.cols)
                            r = r1
                    continue
                for chunk in _chunks(p, reader, start_row):
                    _write_rows(writer, chunk.to(dev) if dev is not None else chunk, spec, row, imat)
                    row += chunk.shape[0]
                    _trim_heap()
                    if progress:
                        progress(spec.name, chunk.numel())
            paths = writer.finish()
    except GGUFFormatError as e:
        raise K2Error(f"{out}: {e}") from None
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        writer.discard()  # a full disk: the partial output would only hold the space that is missing
        raise K2Error(f"{out.parent}: no space left on device; the partial output was removed. Free at least "
                      f"{human_bytes(writer.bytes_total)} and rerun") from None
    counts: dict[str, int] = {}
    for t in types:
        counts[t] = counts.get(t, 0) + 1
    return ConvertResult(paths, writer.resumed_bytes, writer.bytes_total, counts, int4_inexact)


def _copies_int4(p: PlannedTensor, spec: TensorSpec, src: WeightSource) -> bool:
    """Whether planned tensor `p` is INT4 routed experts written as Q4_0 by copying their codes."""
    return (p.build == "experts" and spec.qtype == int(qtype_of("Q4_0")) and getattr(src, "is_int4", False)
            and all(src.int4_parts(n) is not None for n in p.hf))  # type: ignore[attr-defined]


def _write_rows(writer: GGUFStreamWriter, chunk: torch.Tensor, spec: TensorSpec, row0: int, imat) -> None:
    """Quantize rows [row0, row0 + n) of `spec` (imatrix rows chosen per expert / head) and append them."""
    x = chunk.detach().to(torch.float32).contiguous()
    if x.numel() and not all(math.isfinite(v) for v in torch.aminmax(x)):  # NaN/inf show in min or max; 50x
        raise CheckpointError(f"{spec.name}: non-finite values in the source weights (rows {row0}..)")  # isfinite
    workers = 1
    if x.device.type == "cpu":
        x = x.numpy()
        workers = cpu_workers()
    w = imat.weights(spec.name) if imat is not None else None
    if w is None:
        writer.write(quantize_rows(x, spec.qtype, workers=workers))
        return
    per = spec.rows // w.shape[0]
    r = 0
    while r < x.shape[0]:
        g = (row0 + r) // per
        n = min(x.shape[0] - r, (g + 1) * per - (row0 + r))
        writer.write(quantize_rows(x[r:r + n], spec.qtype, w[g], workers=workers))
        r += n


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Give memory freed by the last chunk back to the OS (glibc keeps freed blocks in its per-thread arenas, and
    their fragmentation would otherwise creep up over a long conversion)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def cpu_workers() -> int:
    """Chunks quantized at once on the CPU: the CPUs this process may use ($K2LOCAL_QUANT_WORKERS overrides).

    Each runs with one torch thread: the codecs issue many small ops, where OpenMP fan-out loses (badly so on a
    machine shared with other busy processes), while the numpy scale searches release the GIL."""
    env = os.environ.get("K2LOCAL_QUANT_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise K2Error(f"K2LOCAL_QUANT_WORKERS={env!r}: expected a number of workers") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _check_imatrix(imat, plan: list[PlannedTensor], path) -> None:
    if imat is None:
        return
    for p in plan:
        if len(p.shape) == 3:
            imat.reshape_for(p.name, p.shape[0])  # legacy .dat files store experts flat
        w = imat.weights(p.name)
        if w is None:
            continue
        rows = int(np.prod(p.shape[:-1])) if len(p.shape) > 1 else 1
        if w.shape[1] != p.shape[-1] or rows % w.shape[0]:
            raise K2Error(f"{path}: imatrix entry {p.name} has {w.shape[0]}x{w.shape[1]} values; the model's tensor "
                          f"is {list(p.shape)} (an imatrix of another model?)")


def human_bytes(n: float) -> str:
    """Bytes in the unit that keeps 2-3 significant digits: 512 B, 15.3 MB, 1.2 GB (powers of 1000, like df -H)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(out.parent).free
    if need > free:
        raise K2Error(f"{out.parent}: the output needs {human_bytes(need)} free, only {human_bytes(free)} is; free some "
                      "space and rerun")


def describe_recipes(cfg: ModelConfig | None = None) -> list[tuple[str, str, float, int]]:
    """(name, summary, bits/weight, bytes) of every recipe for `cfg` (default: Kimi K2's config)."""
    cfg = cfg or ModelConfig()
    rows = []
    for r in RECIPES.values():
        size, bpw = projected_size(cfg, r)
        rows.append((r.name, r.summary, bpw, size))
    return rows
