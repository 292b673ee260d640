"""Lazy weight sources: Hugging Face safetensors checkpoints (sharded, FP8 or BF16) with canonical HF tensor names."""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch

from k2local.arch import expected_tensor_names, expert_name
from k2local.config import ModelConfig
from k2local.errors import CheckpointError
from k2local.weights.gguf_checkpoint import GGUFSource
from k2local.weights import sanitize
from k2local.weights.sanitize import SCALE_SUFFIX

TEXT_PREFIX = "language_model."  # Kimi K2.5: the text model inside the multimodal checkpoint
__all__ = ["SCALE_SUFFIX", "SafetensorsSource", "WeightSource", "expected_tensor_names", "expert_name",
           "open_checkpoint"]
_ST_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16,
    "I32": torch.int32, "I64": torch.int64, "BOOL": torch.bool,
}


class WeightSource(Protocol):
    """What the model reads weights from: canonical HF names, tensors dequantized on request."""

    config: ModelConfig
    path: Path

    def has(self, name: str) -> bool: ...

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    def nbytes(self, name: str) -> int: ...


def _check_safetensors_file(path: Path) -> tuple[int, dict[str, Any]]:
    """Fail clearly on a missing, truncated or corrupt shard (before safetensors' own terse errors).

    Returns (absolute offset of the data section, header)."""
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
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated ({size} bytes, header says {8 + n + end})")
    return 8 + n, header


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor's bytes are in its shard."""

    file: Path
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


class _ShardReader:
    """Reads byte ranges of one shard with pread into fresh buffers. No mmap: nothing read stays resident in
    the process's RSS. With `drop_cache`, ranges read are also dropped from the page cache (a one-pass stream
    such as a conversion should not evict everything else on the machine)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def read(self, offset: int, nbytes: int, drop_cache: bool = False) -> torch.Tensor:
        """`nbytes` bytes at `offset` as a new uint8 tensor."""
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, got = memoryview(buf.numpy()), 0
        while got < nbytes:
            try:
                n = os.preadv(self._fd, [view[got:]], offset + got)
            except OSError as e:
                raise CheckpointError(f"{self.path}: read error at byte {offset + got} ({e.strerror})") from None
            if n == 0:
                raise CheckpointError(f"{self.path}: truncated (no data at byte {offset + got})")
            got += n
        if drop_cache and nbytes and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        return buf

    def __del__(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None


class SafetensorsSource:
    """A Hugging Face checkpoint directory: config.json + model.safetensors(.index.json), read lazily.

    Tensors are read with pread into fresh buffers, never memory-mapped, so reading through a whole model leaves
    no file pages counted in the process's RSS. `drop_cache = True` also drops what was read from the page cache
    (for one-pass streams such as `k2local quantize`)."""

    drop_cache: bool = False

    def __init__(self, path: str | Path, validate: bool = True):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        self.config = ModelConfig.load(self.path)
        self.block = sanitize.fp8_block(self.config.quantization_config)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        elif (self.path / "model.safetensors").exists():
            _, header = _check_safetensors_file(self.path / "model.safetensors")
            wm = {k: "model.safetensors" for k in header if k != "__metadata__"}
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors.index.json or model.safetensors")
        self._readers: dict[Path, _ShardReader] = {}
        self._info: dict[str, _TensorInfo] = {}
        for shard in sorted(set(wm.values())):
            base, header = _check_safetensors_file(self.path / shard)
            for name, v in header.items():
                if name == "__metadata__" or wm.get(name) != shard:
                    continue
                try:
                    b, e = (int(o) for o in v["data_offsets"])
                    self._info[name] = _TensorInfo(self.path / shard, str(v["dtype"]),
                                                   tuple(int(d) for d in v["shape"]), base + b, e - b)
                except (KeyError, TypeError, ValueError):
                    raise CheckpointError(f"{self.path / shard}: corrupt header entry for {name}") from None
        # Kimi K2.5 (multimodal): the text model's tensors are under `language_model.`; only those are read, by
        # their text-model names (the vision tower and projector are left out: images are not supported)
        self.other_tensors = 0
        if any(n.startswith(TEXT_PREFIX) for n in wm):
            text = {n[len(TEXT_PREFIX):]: n for n in wm if n.startswith(TEXT_PREFIX)}
            self.other_tensors = len(wm) - len(text)
            wm = {short: wm[full] for short, full in text.items()}
            self._info = {short: self._info[full] for short, full in text.items() if full in self._info}
        self.weight_map: dict[str, str] = wm
        # compressed-tensors INT4 (Kimi K2 Thinking, K2.5): `<base>.weight` stands for weight_packed + weight_scale
        self._int4: dict[str, tuple[str, str]] = {}
        if self.config.is_int4:
            for n in list(wm):
                if n.endswith(".weight_packed"):
                    base = n[: -len("_packed")]
                    sname = base + "_scale"
                    if sname not in wm:
                        raise CheckpointError(f"{self.path}: INT4 tensor {n} has no {sname}")
                    self._int4[base] = (n, sname)
                    wm.setdefault(base, wm[n])
        if validate:
            missing = [n for n in expected_tensor_names(self.config) if n not in wm]
            if missing:
                more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
                raise CheckpointError(f"{index}: missing tensor(s) {', '.join(missing[:3])}{more}")

    def names(self) -> Iterable[str]:
        return (n for n in self.weight_map if not sanitize.is_scale_name(n) and sanitize.int4_base(n) is None)

    @property
    def is_int4(self) -> bool:
        return bool(self._int4)

    def int4_parts(self, name: str) -> tuple[_TensorInfo, _TensorInfo] | None:
        """Where INT4 weight `name`'s weight_packed and weight_scale are (None for tensors that are not INT4)."""
        parts = self._int4.get(name)
        if parts is None:
            return None
        packed, scale = (self._tensor_info(p) for p in parts)
        rows, cols = packed.shape[0], packed.shape[1] * 8 if len(packed.shape) == 2 else 0
        if (packed.dtype != "I32" or len(packed.shape) != 2 or scale.dtype not in ("BF16", "F16", "F32")
                or len(scale.shape) != 2 or scale.shape[0] != rows or scale.shape[1] * sanitize.INT4_GROUP != cols):
            raise CheckpointError(f"{packed.file}: {name}: INT4 weight_packed {packed.dtype} {list(packed.shape)} / "
                                  f"weight_scale {scale.dtype} {list(scale.shape)} are not int32 [out, in/8] with "
                                  f"one scale per {sanitize.INT4_GROUP} inputs")
        return packed, scale

    def tensor_location(self, name: str) -> _TensorInfo:
        """File, dtype, shape, absolute offset and size of stored tensor `name`."""
        return self._tensor_info(name)

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def _tensor_info(self, name: str) -> _TensorInfo:
        info = self._info.get(name)
        if info is None:
            shard = self.weight_map.get(name)
            if shard is None:
                raise CheckpointError(f"{self.path}: tensor {name} not in checkpoint")
            raise CheckpointError(f"{self.path / shard}: cannot read {name} (listed in the index, not in the shard)")
        return info

    def _read(self, name: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Tensor `name` as stored (only rows r0:r1 of its first dimension when r0 is given), read with pread."""
        info = self._tensor_info(name)
        dtype = _ST_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{info.file}: {name} has unsupported dtype {info.dtype}")
        shape = info.shape
        if math.prod(shape) * dtype.itemsize != info.nbytes:
            raise CheckpointError(f"{info.file}: {name}: {info.nbytes} bytes do not fit shape {list(shape)} "
                                  f"{info.dtype}")
        offset, nbytes = info.offset, info.nbytes
        if r0 is not None:
            r1 = shape[0] if r1 is None else r1
            if not shape or not 0 <= r0 <= r1 <= shape[0]:
                raise CheckpointError(f"{info.file}: cannot read rows {r0}:{r1} of {name} {list(shape)}")
            row = nbytes // shape[0] if shape[0] else 0
            offset, nbytes, shape = offset + r0 * row, (r1 - r0) * row, (r1 - r0, *shape[1:])
        reader = self._readers.get(info.file)
        if reader is None:
            reader = self._readers[info.file] = _ShardReader(info.file)
        return reader.read(offset, nbytes, self.drop_cache).view(dtype).reshape(shape)

    def _get_int4(self, name: str, r0: int | None = None, r1: int | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        packed_i, scale_i = self.int4_parts(name)  # type: ignore[misc]
        pname, sname = self._int4[name]
        try:
            return sanitize.dequantize_int4(self._read(pname, r0, r1), self._read(sname, r0, r1), dtype=dtype)
        except ValueError as e:
            raise CheckpointError(f"{packed_i.file}: {name}: {e}") from None

    def q4_0_rows(self, name: str, r0: int, r1: int) -> tuple[torch.Tensor, int]:
        """Rows r0:r1 of INT4 weight `name` as Q4_0 bytes (uint8 [n, cols / 32 * 18]: the same 4-bit codes, the
        scale as fp16) and how many block scales were not fp16 values (rounded; see sanitize.repack_int4)."""
        packed_i, _ = self.int4_parts(name)  # type: ignore[misc]
        pname, sname = self._int4[name]
        try:
            return sanitize.repack_int4(self._read(pname, r0, r1), self._read(sname, r0, r1))
        except ValueError as e:
            raise CheckpointError(f"{packed_i.file}: {name}: {e}") from None

    def raw(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tensor as stored, and its FP8 block scale_inv (None for BF16/F32 tensors); for an INT4 weight its
        weight_packed and weight_scale."""
        if name in self._int4:
            self.int4_parts(name)
            return self._read(self._int4[name][0]), self._read(self._int4[name][1])
        t = self._read(name)
        scale = None
        if sanitize.needs_scale(t):
            sname = sanitize.scale_name(name)
            if sname not in self.weight_map:
                raise CheckpointError(f"{self.path}: FP8 tensor {name} has no {sname}")
            scale = self._read(sname)
        return t, scale

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight dequantized to `dtype` (FP8 block scales applied, partial edge blocks handled; INT4 codes
        times their group scales)."""
        if name in self._int4:
            return self._get_int4(name, dtype=dtype)
        t, scale = self.raw(name)
        try:
            return sanitize.dequantize(t, scale, self.block, dtype)
        except ValueError as e:
            raise CheckpointError(f"{self.path / self.weight_map[name]}: {name}: {e}") from None

    def get_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of a 2-D weight as float32, reading only those rows (and their FP8 scale rows)."""
        if name in self._int4:
            return self._get_int4(name, r0, r1)
        info = self._tensor_info(name)
        if info.dtype not in sanitize.FP8_DTYPES:
            return self._read(name, r0, r1).to(torch.float32)
        sname = sanitize.scale_name(name)
        if sname not in self.weight_map:
            raise CheckpointError(f"{self.path}: FP8 tensor {name} has no {sname}")
        sshape = self._tensor_info(sname).shape
        a0, s0, s1 = sanitize.fp8_row_window(r0, r1, self.block[0], sshape[0] if sshape else 0)
        scale = self._read(sname, s0, s1)
        try:
            return sanitize.dequantize(self._read(name, a0, r1), scale, self.block, torch.float32)[r0 - a0:]
        except ValueError as e:
            raise CheckpointError(f"{info.file}: {name} rows {r0}:{r1}: {e}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._int4:
            packed, _ = self.int4_parts(name)  # type: ignore[misc]
            return (packed.shape[0], packed.shape[1] * 8)
        return self._tensor_info(name).shape

    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies on disk (scale included)."""
        if name in self._int4:
            return sum(self._tensor_info(n).nbytes for n in self._int4[name])
        size = self._tensor_info(name).nbytes
        if sanitize.scale_name(name) in self.weight_map:
            size += self.nbytes(sanitize.scale_name(name))
        return size


def open_checkpoint(path: str | Path) -> WeightSource:
    """Open a checkpoint: a Hugging Face directory, or a GGUF file (single or the first of a split)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix == ".gguf" or (p.is_dir() and not (p / "config.json").exists()
                                               and any(p.glob("*.gguf"))):
        return GGUFSource(p)
    return SafetensorsSource(p)
