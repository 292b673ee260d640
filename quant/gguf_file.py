"""GGUF files at the format level: a streaming, resumable, atomically finished writer; split naming; row codecs.

No model knowledge lives here. The writer needs the full tensor list (names, shapes, types) up front, writes every
header immediately, then takes tensor bytes in order, so peak memory is whatever one chunk of rows takes.

Resume: data goes to ``<final>.partial`` files; a sidecar ``<first final>.resume.json`` records a fingerprint of all
headers (plus a caller-supplied string) and how many bytes of the tensor stream are on disk (fsynced first). A new
writer with the same fingerprint truncates the partial files to that point and continues. Only when every tensor
is written are the partial files renamed to their final names (the first split last), so a ``.gguf`` on disk is
always complete.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
from gguf.constants import GGMLQuantizationType, GGUFValueType

from quant import types as qtypes

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32
SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFFormatError(ValueError):
    """A GGUF-level problem (bad type, wrong byte count, inconsistent resume state)."""


# ------------------------------------------------------------------------------------------------------ types & sizes
# quant.types holds the table; these raise GGUFFormatError (a ValueError) as the rest of this module does.
def qtype_of(name_or_type: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """'Q4_K' / 'q4_k' / 12 -> GGMLQuantizationType."""
    try:
        return qtypes.qtype_of(name_or_type)
    except ValueError as e:
        raise GGUFFormatError(str(e)) from None


def block_size(qtype: int) -> int:
    try:
        return qtypes.block_size(qtype)
    except ValueError as e:
        raise GGUFFormatError(str(e)) from None


def row_bytes(qtype: int, cols: int) -> int:
    """Bytes of one row of `cols` values in `qtype` (cols must be a multiple of the block size)."""
    try:
        return qtypes.row_bytes(qtype, cols)
    except ValueError as e:
        raise GGUFFormatError(str(e)) from None


def bits_per_weight(qtype: int) -> float:
    try:
        return qtypes.bits_per_weight(qtype)
    except ValueError as e:
        raise GGUFFormatError(str(e)) from None


def tensor_nbytes(shape: Iterable[int], qtype: int) -> int:
    """Bytes of a tensor of torch-order `shape` (last dim = columns = ggml ne0)."""
    shape = tuple(int(s) for s in shape)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    return rows * row_bytes(qtype, shape[-1])


# ----------------------------------------------------------------------------------------------------- row codecs
# quant.codecs (ggml-exact) where it has the type; gguf-py for the rest (Q4_0/Q5_0/Q5_1 fallbacks, IQ decoding).
_FLOAT = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


def _own_codec_has(qtype: GGMLQuantizationType) -> Any:
    """quant.codecs (ggml-exact K-quants and Q8_0) when it has `qtype`, else None (gguf-py is used)."""
    try:
        from quant import codecs  # noqa: PLC0415
    except ImportError:
        return None
    try:
        codecs.codec(int(qtype))
    except ValueError:
        return None
    return codecs


def can_quantize(qtype: int, cols: int) -> bool:
    """Whether `qtype` rows of `cols` values can be produced here (block fit and an available encoder)."""
    qt = qtype_of(qtype)
    if cols % qtypes.block_size(qt):
        return False
    if qt in _FLOAT or qt == GGMLQuantizationType.BF16:
        return True
    return _own_codec_has(qt) is not None or _gguf_py_quantizes(qt)


@functools.lru_cache(maxsize=None)
def _gguf_py_quantizes(qt: GGMLQuantizationType) -> bool:
    from gguf import quants  # noqa: PLC0415

    try:
        quants.quantize(np.zeros((1, qtypes.block_size(qt)), np.float32), qt)
        return True
    except (quants.QuantError, NotImplementedError, KeyError, TypeError):
        return False


def quantize_rows(x: Any, qtype: int, imatrix: np.ndarray | None = None, workers: int = 1) -> np.ndarray:
    """float32 [rows, cols] (numpy, or a torch tensor on any device) -> uint8 numpy [rows, row_bytes].

    `imatrix` ([cols] importance) is used by the types whose encoder supports it (the K-quants). `workers` > 1:
    CPU rows are quantized that many chunks at a time (quant.codecs.quantize)."""
    qt = qtype_of(qtype)
    mod = _own_codec_has(qt)
    is_torch = type(x).__module__.startswith("torch")
    if mod is not None and is_torch:  # torch tensor: quantize where it lives (CPU threads or CUDA)
        rows, cols = x.shape
        out = np.asarray(mod.quantize(x, int(qt), imatrix=None if imatrix is None else
                                      np.asarray(imatrix, np.float32), workers=workers))
        return out.view(np.uint8).reshape(rows, row_bytes(qt, cols))
    if is_torch:
        x = x.detach().float().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if qt == GGMLQuantizationType.F16:  # torch's conversion (same IEEE rounding) is ~20x numpy's astype
        import torch  # noqa: PLC0415

        return torch.from_numpy(x).to(torch.float16).numpy().view(np.uint8).reshape(rows, -1)
    if qt in _FLOAT:
        return x.astype(_FLOAT[qt]).view(np.uint8).reshape(rows, -1)
    if mod is not None:
        w = None if imatrix is None else np.asarray(imatrix, np.float32)
        out = np.asarray(mod.quantize(x, int(qt), imatrix=w, workers=workers))
        return out.view(np.uint8).reshape(rows, row_bytes(qt, cols))
    if imatrix is not None and qt in _LEGACY_NMAX:
        return _quantize_legacy_imatrix(x, qt, np.asarray(imatrix, np.float32))
    from gguf import quants  # noqa: PLC0415

    try:
        out = quants.quantize(x, qt)
    except (quants.QuantError, NotImplementedError) as e:
        raise GGUFFormatError(f"no encoder for {qt.name} here ({e})") from None
    return np.ascontiguousarray(out).view(np.uint8).reshape(rows, row_bytes(qt, cols))


# Q4_0 / Q5_0 with importance weights (ggml's quantize_row_q4_0_impl / q5_0_impl): the types llama.cpp falls back
# to when a K-quant does not fit a row, so with an imatrix they are weighted exactly as llama-quantize does.
_LEGACY_NMAX = {GGMLQuantizationType.Q4_0: 8, GGMLQuantizationType.Q5_0: 16}


def _quantize_legacy_imatrix(x: np.ndarray, qt: GGMLQuantizationType, imatrix: np.ndarray) -> np.ndarray:
    import torch  # noqa: PLC0415

    from quant.ggml_float import div, seq_sum, sqrtf  # noqa: PLC0415
    from quant.kquant_search import make_qx_quants  # noqa: PLC0415

    rows, cols = x.shape
    if imatrix.size != cols:
        raise GGUFFormatError(f"imatrix has {imatrix.size} values, rows have {cols}")
    nmax = _LEGACY_NMAX[qt]
    xt = torch.from_numpy(x)
    sigma2 = div(seq_sum((xt * xt).t().contiguous()), float(cols))  # [rows], C-order float sum over the row
    nb = cols // 32
    xb = xt.reshape(rows * nb, 32)
    qw = torch.from_numpy(np.ascontiguousarray(imatrix)).reshape(1, nb, 32).expand(rows, nb, 32).reshape(-1, 32)
    w = qw * sqrtf(sigma2.repeat_interleave(nb)[:, None] + xb * xb)
    L, d = make_qx_quants(xb.t().contiguous(), nmax, w.t().contiguous())  # element-major [32, blocks]
    L = L.t().to(torch.int64)  # [blocks, 32], 0..2*nmax-1
    dh = d.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)
    lo, hi = L[:, :16], L[:, 16:]
    qs = ((lo & 0x0F) | ((hi & 0x0F) << 4)).to(torch.uint8)
    if qt == GGMLQuantizationType.Q4_0:
        blocks = torch.cat([dh, qs], 1)
    else:
        bits = torch.cat([(lo >> 4) & 1, (hi >> 4) & 1], 1)  # bit j of qh: 5th bit of L[j]
        qh = (bits << torch.arange(32)).sum(1).to(torch.int64)
        qh_bytes = torch.stack([(qh >> (8 * k)) & 0xFF for k in range(4)], 1).to(torch.uint8)
        blocks = torch.cat([dh, qh_bytes, qs], 1)
    return blocks.numpy().reshape(rows, row_bytes(qt, cols))


def dequantize_rows(data: np.ndarray, qtype: int, cols: int) -> np.ndarray:
    """uint8 [..., row_bytes] (any leading shape) -> float32 [..., cols]."""
    qt = qtype_of(qtype)
    data = np.asarray(data)
    lead = data.shape[:-1]
    flat = np.ascontiguousarray(data).reshape(-1, row_bytes(qt, cols))
    if qt in _FLOAT:
        out = flat.view(_FLOAT[qt]).astype(np.float32)
    elif qt == GGMLQuantizationType.BF16:
        out = (flat.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        mod = _own_codec_has(qt)
        if mod is not None:
            with warnings.catch_warnings():  # read-only memmaps are only read here
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                out = mod.dequantize(flat, int(qt), cols).numpy()
        else:
            from gguf import quants  # noqa: PLC0415

            out = quants.dequantize(flat, qt)
    return np.asarray(out, dtype=np.float32).reshape(*lead, cols)


# -------------------------------------------------------------------------------------------------- metadata values
@dataclass(frozen=True)
class MetaValue:
    """A typed GGUF metadata value; arrays carry `item_type`."""

    vtype: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None


def u32(v: int) -> MetaValue:
    return MetaValue(GGUFValueType.UINT32, int(v))


def u16(v: int) -> MetaValue:
    return MetaValue(GGUFValueType.UINT16, int(v))


def i32(v: int) -> MetaValue:
    return MetaValue(GGUFValueType.INT32, int(v))


def f32v(v: float) -> MetaValue:
    return MetaValue(GGUFValueType.FLOAT32, float(v))


def boolv(v: bool) -> MetaValue:
    return MetaValue(GGUFValueType.BOOL, bool(v))


def strv(v: str) -> MetaValue:
    return MetaValue(GGUFValueType.STRING, str(v))


def arr(items: list, item_type: GGUFValueType) -> MetaValue:
    return MetaValue(GGUFValueType.ARRAY, list(items), item_type)


_SCALAR_FMT = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NP_DTYPE = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pack_value(v: MetaValue) -> bytes:
    if v.vtype == GGUFValueType.STRING:
        return _pack_str(v.value)
    if v.vtype == GGUFValueType.ARRAY:
        assert v.item_type is not None
        head = struct.pack("<IQ", int(v.item_type), len(v.value))
        if v.item_type == GGUFValueType.STRING:
            return head + b"".join(_pack_str(s) for s in v.value)
        return head + np.asarray(v.value, dtype=_NP_DTYPE[v.item_type]).tobytes()
    return struct.pack(_SCALAR_FMT[v.vtype], v.value)


# ------------------------------------------------------------------------------------------------------ tensor specs
@dataclass(frozen=True)
class TensorSpec:
    """One tensor to write: GGUF name, torch-order shape (last dim = columns), ggml type."""

    name: str
    shape: tuple[int, ...]
    qtype: int

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)

    @property
    def cols(self) -> int:
        return self.shape[-1]

    @property
    def rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.qtype, self.cols)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def split_name(out: Path, index: int, count: int) -> Path:
    """llama.cpp's split naming: model.gguf -> model-00001-of-00003.gguf (index is 0-based)."""
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return out.with_name(f"{stem}-{index + 1:05d}-of-{count:05d}.gguf")


def split_parts(path: Path) -> list[Path]:
    """All files of a (possibly split) GGUF given any one of them; a plain file gives [path]."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m.group("count"))
    return [path.with_name(f"{m.group('prefix')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def plan_splits(tensors: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors in order into files whose tensor data stays under `max_bytes` (0: one file).

    A single tensor larger than the limit gets a file of its own; no file is empty."""
    if max_bytes <= 0 or not tensors:
        return [list(tensors)]
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += _align(t.nbytes, DEFAULT_ALIGNMENT)
    return groups


def build_header(metadata: dict[str, MetaValue], tensors: list[TensorSpec], alignment: int = DEFAULT_ALIGNMENT
                 ) -> tuple[bytes, list[int]]:
    """The header (padded to `alignment`) and each tensor's offset within the data section."""
    out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata))]
    for key, v in metadata.items():
        if not isinstance(v, MetaValue):
            raise GGUFFormatError(f"metadata {key}: expected a MetaValue, got {type(v).__name__}")
        out += [_pack_str(key), struct.pack("<I", int(v.vtype)), _pack_value(v)]
    offsets, pos = [], 0
    for t in tensors:
        ne = list(reversed(t.shape))
        out += [_pack_str(t.name), struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *ne),
                struct.pack("<IQ", int(t.qtype), pos)]
        offsets.append(pos)
        pos = _align(pos + t.nbytes, alignment)
    head = b"".join(out)
    return head + b"\0" * (_align(len(head), alignment) - len(head)), offsets


# ------------------------------------------------------------------------------------------------------------ writer
class GGUFStreamWriter:
    """Writes one GGUF (optionally split) tensor by tensor; resumable; atomic at `finish()`.

    Usage::

        w = GGUFStreamWriter(out, metadata, specs, split_max_bytes=..., fingerprint_extra=...)
        for spec, done in w.remaining():      # done = bytes of this tensor already on disk (resume)
            for chunk in produce(spec, start_byte=done):
                w.write(chunk)                  # uint8 / any ndarray / bytes, appended to the current tensor
                w.checkpoint()                  # optional: make progress so far resumable
        paths = w.finish()
    """

    def __init__(self, out: str | Path, metadata: dict[str, MetaValue], tensors: list[TensorSpec], *,
                 split_max_bytes: int = 0, fingerprint_extra: str = "", alignment: int = DEFAULT_ALIGNMENT,
                 checkpoint_bytes: int = 512 << 20):
        self.out = Path(out)
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            raise GGUFFormatError("duplicate tensor names")
        self.alignment = alignment
        self.checkpoint_bytes = checkpoint_bytes
        groups = plan_splits(tensors, split_max_bytes)
        n = len(groups)
        self.paths = [self.out] if n == 1 else [split_name(self.out, i, n) for i in range(n)]
        self.tensors = [t for g in groups for t in g]
        self._file_of: list[int] = [i for i, g in enumerate(groups) for _ in g]
        self._headers: list[bytes] = []
        self._offsets: list[int] = []  # absolute file offset of each tensor's data
        for i, g in enumerate(groups):
            meta = dict(metadata) if i == 0 else {}
            if n > 1:
                meta["split.no"] = u16(i)
                meta["split.count"] = u16(n)
                meta["split.tensors.count"] = i32(len(self.tensors))
            if alignment != DEFAULT_ALIGNMENT:
                meta["general.alignment"] = u32(alignment)
            head, offs = build_header(meta, g, alignment)
            self._headers.append(head)
            self._offsets += [len(head) + o for o in offs]
        h = hashlib.sha256(fingerprint_extra.encode())
        for head in self._headers:
            h.update(hashlib.sha256(head).digest())
        self.fingerprint = h.hexdigest()
        self.partials = [p.with_name(p.name + ".partial") for p in self.paths]
        self.state_path = self.paths[0].with_name(self.paths[0].name + ".resume.json")
        self.bytes_total = sum(t.nbytes for t in self.tensors)
        self._fh: dict[int, BinaryIO] = {}
        self._cur = 0  # index of the tensor being written
        self._cur_done = 0  # bytes of it written
        self._since_sync = 0
        self.resumed_bytes = self._open()

    # -- state
    def _load_state(self) -> tuple[int, int] | None:
        try:
            st = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        if st.get("fingerprint") != self.fingerprint:
            return None
        try:
            cur, done = int(st["tensor"]), int(st["bytes"])
        except (KeyError, TypeError, ValueError):
            return None
        if not (0 <= cur <= len(self.tensors)) or done < 0 or (cur < len(self.tensors)
                                                                and done > self.tensors[cur].nbytes):
            return None
        # every partial file up to the current one must hold at least what the state claims
        for fi in range(len(self.paths)):
            need = self._need_size(fi, cur, done)
            if need and (not self.partials[fi].exists() or self.partials[fi].stat().st_size < need):
                return None
        return cur, done

    def _need_size(self, fi: int, cur: int, done: int) -> int:
        """Bytes partial file `fi` must contain for state (cur, done); 0 when nothing of it was started."""
        idx = [k for k in range(len(self.tensors)) if self._file_of[k] == fi]
        first = idx[0]
        if cur < first:
            return 0
        if cur > idx[-1]:
            last = idx[-1]
            return self._offsets[last] + self.tensors[last].nbytes
        return self._offsets[cur] + done

    def _save_state(self) -> None:
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "tensor": self._cur, "bytes": self._cur_done,
                                       "files": [p.name for p in self.paths]}))
            os.replace(tmp, self.state_path)
        except BaseException:  # a full disk (or an interrupt) must not leave an empty .tmp behind
            tmp.unlink(missing_ok=True)
            raise

    def _open(self) -> int:
        st = self._load_state()
        if st is None:
            for p in self.partials:
                p.unlink(missing_ok=True)
            self._cur, self._cur_done = 0, 0
            self._save_state()
            self._skip_empty()
            return 0
        self._cur, self._cur_done = st
        for fi in range(len(self.paths)):
            need = self._need_size(fi, *st)
            if need:
                with open(self.partials[fi], "r+b") as f:
                    f.truncate(need)
            else:
                self.partials[fi].unlink(missing_ok=True)
        self._skip_empty()
        done = sum(t.nbytes for t in self.tensors[: self._cur]) + self._cur_done
        return done

    def _file(self, fi: int) -> BinaryIO:
        f = self._fh.get(fi)
        if f is None:
            p = self.partials[fi]
            if p.exists():
                f = open(p, "r+b")
                f.seek(0, os.SEEK_END)
            else:
                f = open(p, "w+b")
                f.write(self._headers[fi])
            self._fh[fi] = f
        return f

    def _skip_empty(self) -> None:
        while self._cur < len(self.tensors) and self.tensors[self._cur].nbytes == self._cur_done:
            self._advance()

    def _advance(self) -> None:
        fi = self._file_of[self._cur]
        f = self._file(fi)
        end = self._offsets[self._cur] + self.tensors[self._cur].nbytes
        nxt = self._cur + 1
        pad_to = self._offsets[nxt] if nxt < len(self.tensors) and self._file_of[nxt] == fi else end
        if pad_to > end:
            f.write(b"\0" * (pad_to - end))
        self._cur, self._cur_done = nxt, 0

    # -- public
    @property
    def current_index(self) -> int:
        """Index (in `tensors`) of the tensor being written; len(tensors) when all are written."""
        return self._cur

    @property
    def bytes_done(self) -> int:
        return sum(t.nbytes for t in self.tensors[: self._cur]) + self._cur_done

    def remaining(self) -> Iterator[tuple[TensorSpec, int]]:
        """Tensors still to write, in order, each with the bytes of it already on disk."""
        while self._cur < len(self.tensors):
            idx = self._cur
            yield self.tensors[idx], self._cur_done
            if self._cur == idx:
                t = self.tensors[idx]
                raise GGUFFormatError(f"{t.name}: {self._cur_done} of {t.nbytes} bytes written")

    def write(self, data: np.ndarray | bytes | memoryview) -> None:
        """Append bytes to the current tensor; it completes when exactly its size has been written."""
        if self._cur >= len(self.tensors):
            raise GGUFFormatError("all tensors are already written")
        buf = memoryview(np.ascontiguousarray(data).view(np.uint8).reshape(-1)) if isinstance(data, np.ndarray) \
            else memoryview(data).cast("B")
        t = self.tensors[self._cur]
        if self._cur_done + len(buf) > t.nbytes:
            raise GGUFFormatError(f"{t.name}: got {self._cur_done + len(buf)} bytes, expected {t.nbytes}")
        f = self._file(self._file_of[self._cur])
        f.write(buf)
        self._cur_done += len(buf)
        self._since_sync += len(buf)
        if self._cur_done == t.nbytes:
            self._advance()
            self._skip_empty()
        if self._since_sync >= self.checkpoint_bytes:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make everything written so far durable and resumable."""
        for f in self._fh.values():
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):  # written and durable: its pages need not stay in the page cache
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self._save_state()
        self._since_sync = 0

    def finish(self) -> list[Path]:
        """Check completeness, fsync, and rename the partial files to their final names (first split last)."""
        if self._cur < len(self.tensors):
            raise GGUFFormatError(f"{self.tensors[self._cur].name} and later tensors were not written")
        for fi in range(len(self.paths)):
            self._file(fi)  # files with only zero-size tensors still need their header
        self.checkpoint()
        self.close()
        for fi, (part, final) in enumerate(zip(self.partials, self.paths)):
            want = self._need_size(fi, len(self.tensors), 0)
            want = max(want, len(self._headers[fi]))
            if part.stat().st_size != want:
                raise GGUFFormatError(f"{part}: {part.stat().st_size} bytes, expected {want}")
        for part, final in reversed(list(zip(self.partials, self.paths))):
            os.replace(part, final)
        _fsync_dir(self.paths[0].parent)
        self.state_path.unlink(missing_ok=True)
        return list(self.paths)

    def close(self) -> None:
        """Close files, keeping the partial output and resume state (call after an error or Ctrl-C)."""
        for f in self._fh.values():
            try:
                f.close()
            except OSError:
                pass
        self._fh.clear()

    def discard(self) -> None:
        """Remove partial files and state (the output will start over next time)."""
        self.close()
        for p in self.partials:
            p.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        self.state_path.with_name(self.state_path.name + ".tmp").unlink(missing_ok=True)

    def __enter__(self) -> "GGUFStreamWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None and self._fh:
            try:
                self.checkpoint()
            except OSError:
                pass
        self.close()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
