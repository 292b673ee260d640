"""Lazy weight sources: Hugging Face safetensors checkpoints (sharded, FP8 or BF16) with canonical HF tensor names."""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Protocol

import torch
from safetensors import safe_open

from k2local.config import ModelConfig
from k2local.errors import CheckpointError
from quant.fp8 import dequantize_fp8_block

SCALE_SUFFIX = "_scale_inv"


def expert_name(layer: int, expert: int, proj: str) -> str:
    """HF name of one routed expert matrix; proj is 'gate', 'up' or 'down'."""
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"


def expected_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every weight the forward pass reads, by HF name (no scales, no MTP layers, no rotary inv_freq)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            names.append(a + "q_proj.weight")
        else:
            names += [a + "q_a_proj.weight", a + "q_a_layernorm.weight", a + "q_b_proj.weight"]
        names += [a + "kv_a_proj_with_mqa.weight", a + "kv_a_layernorm.weight", a + "kv_b_proj.weight",
                  a + "o_proj.weight"]
        m = p + "mlp."
        if cfg.is_moe_layer(i):
            names.append(m + "gate.weight")
            if cfg.topk_method == "noaux_tc":
                names.append(m + "gate.e_score_correction_bias")
            for e in range(cfg.n_routed_experts):
                names += [expert_name(i, e, w) for w in ("gate", "up", "down")]
            if cfg.n_shared_experts:
                names += [m + f"shared_experts.{w}_proj.weight" for w in ("gate", "up", "down")]
        else:
            names += [m + f"{w}_proj.weight" for w in ("gate", "up", "down")]
    return names


class WeightSource(Protocol):
    """What the model reads weights from: canonical HF names, tensors dequantized on request."""

    config: ModelConfig
    path: Path

    def has(self, name: str) -> bool: ...

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def nbytes(self, name: str) -> int: ...


def _check_safetensors_file(path: Path) -> None:
    """Fail clearly on a missing, truncated or corrupt shard (before safetensors' own terse errors)."""
    if not path.exists():
        raise CheckpointError(f"{path}: shard listed in the index is missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header says {8 + n + end})")


class SafetensorsSource:
    """A Hugging Face checkpoint directory: config.json + model.safetensors(.index.json), memory-mapped lazily."""

    def __init__(self, path: str | Path, validate: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self.config = ModelConfig.load(self.path)
        self.block = tuple((self.config.quantization_config or {}).get("weight_block_size", (128, 128)))
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        elif (self.path / "model.safetensors").exists():
            single = self.path / "model.safetensors"
            _check_safetensors_file(single)
            with safe_open(single, framework="pt") as f:
                wm = {k: "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors.index.json or model.safetensors")
        self.weight_map: dict[str, str] = wm
        self._files: dict[str, object] = {}
        for shard in sorted(set(wm.values())):
            _check_safetensors_file(self.path / shard)
        if validate:
            missing = [n for n in expected_tensor_names(self.config) if n not in wm]
            if missing:
                more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                raise CheckpointError(f"{index}: missing tensor(s) {', '.join(missing[:3])}{more}")

    def _open(self, shard: str):
        f = self._files.get(shard)
        if f is None:
            try:
                f = safe_open(self.path / shard, framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path / shard}: cannot open ({e})") from None
            self._files[shard] = f
        return f

    def names(self) -> Iterable[str]:
        return (n for n in self.weight_map if not n.endswith(SCALE_SUFFIX))

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def raw(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tensor as stored, and its FP8 block scale_inv (None for BF16/F32 tensors)."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {name} not in checkpoint")
        try:
            t = self._open(shard).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.path / shard}: cannot read {name} ({e})") from None
        scale = None
        if t.element_size() == 1:
            sname = name + SCALE_SUFFIX
            if sname not in self.weight_map:
                raise CheckpointError(f"{self.path}: FP8 tensor {name} has no {sname}")
            scale = self._open(self.weight_map[sname]).get_tensor(sname)
        return t, scale

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight dequantized to `dtype` (FP8 block scales applied, partial edge blocks handled)."""
        t, scale = self.raw(name)
        if scale is None:
            return t.to(dtype)
        try:
            return dequantize_fp8_block(t, scale, self.block, dtype)  # type: ignore[arg-type]
        except ValueError as e:
            raise CheckpointError(f"{self.path / self.weight_map[name]}: {name}: {e}") from None

    def get_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of a 2-D weight as float32, reading only those rows (and their FP8 scale rows)."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.path}: tensor {name} not in checkpoint")
        try:
            sl = self._open(shard).get_slice(name)
            if sl.get_dtype() != "F8_E4M3":
                return sl[r0:r1].to(torch.float32)
            br = self.block[0]
            a0 = r0 // br * br
            sname = name + SCALE_SUFFIX
            if sname not in self.weight_map:
                raise CheckpointError(f"{self.path}: FP8 tensor {name} has no {sname}")
            scale = self._open(self.weight_map[sname]).get_slice(sname)[a0 // br: -(-r1 // br)]
            return dequantize_fp8_block(sl[a0:r1], scale, self.block, torch.float32)[r0 - a0:]  # type: ignore
        except CheckpointError:
            raise
        except Exception as e:  # safetensors / shape errors on a corrupt shard
            raise CheckpointError(f"{self.path / shard}: cannot read rows {r0}:{r1} of {name} ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self.weight_map[name]
        return tuple(self._open(shard).get_slice(name).get_shape())

    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies on disk (scale included)."""
        shard = self.weight_map[name]
        sl = self._open(shard).get_slice(name)
        n = 1
        for d in sl.get_shape():
            n *= d
        size = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}.get(sl.get_dtype(), 4) * n
        if name + SCALE_SUFFIX in self.weight_map:
            size += self.nbytes(name + SCALE_SUFFIX)
        return size


def open_checkpoint(path: str | Path) -> WeightSource:
    """Open a checkpoint: a Hugging Face directory, or a GGUF file (single or the first of a split)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").exists()
                                               and any(p.glob("*.gguf"))):
        from k2local.gguf_source import GGUFSource  # noqa: PLC0415 (optional dependency path)

        return GGUFSource(p)
    return SafetensorsSource(p)
