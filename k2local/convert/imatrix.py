"""Importance matrices: per-column activation statistics (mean of x^2) of every matrix the model multiplies.

`collect` runs k2local's forward over calibration text and records, under llama.cpp's GGUF tensor names, the
squared inputs of each linear layer (per expert for the stacked experts, per head for `attn_k_b`/`attn_v_b`).
Files use llama.cpp's GGUF imatrix format (`<name>.in_sum2` [n_mat, cols] and `<name>.counts` [n_mat, 1], F32), so
imatrix files from llama-imatrix (GGUF, or the legacy .dat) load here and ours load in llama-quantize.
Quantization then weighs each column's rounding error by its importance.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from gguf import GGUFValueType

from k2local.errors import CheckpointError, K2Error
from k2local.linear import linear, observe_linear
from quant.gguf_file import GGUFStreamWriter, MetaValue, TensorSpec, arr, strv, u32


@dataclass
class IMatrix:
    """Sums of squared activations [n_mat, cols] and token counts [n_mat] per GGUF tensor name."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def add(self, name: str, sq_sum: np.ndarray, count: np.ndarray | int) -> None:
        """Accumulate `sq_sum` [n_mat, cols] and `count` (per matrix or one number for all)."""
        sq = np.asarray(sq_sum, dtype=np.float64).reshape(-1, np.asarray(sq_sum).shape[-1])
        cnt = np.broadcast_to(np.asarray(count, dtype=np.float64), (sq.shape[0],))
        if name not in self.sums:
            self.sums[name] = np.zeros_like(sq)
            self.counts[name] = np.zeros(sq.shape[0])
        self.sums[name] += sq
        self.counts[name] += cnt

    def weights(self, name: str) -> np.ndarray | None:
        """Importance [n_mat, cols] = mean x^2 (ones where a matrix saw no tokens), or None if absent."""
        s = self.sums.get(name)
        if s is None:
            return None
        # in float32 from the float32 values a file holds, as llama-quantize computes it (same bytes out)
        s32 = s.astype(np.float32)
        c = np.round(self.counts[name]).astype(np.float32)[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            w = np.where(c > 0, s32 / np.maximum(c, np.float32(1)), np.float32(1))
        return w.astype(np.float32)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for k in sorted(self.sums):
            h.update(k.encode())
            h.update(np.ascontiguousarray(self.sums[k], np.float32).tobytes())
            h.update(np.ascontiguousarray(self.counts[k], np.float32).tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write llama.cpp's GGUF imatrix format (atomically)."""
        path = Path(path)
        md: dict[str, MetaValue] = {
            "general.type": strv("imatrix"),
            "imatrix.datasets": arr(self.datasets, GGUFValueType.STRING),
            "imatrix.chunk_count": u32(self.chunk_count),
            "imatrix.chunk_size": u32(self.chunk_size),
        }
        specs, data = [], []
        for name in sorted(self.sums):
            s = self.sums[name].astype(np.float32)
            c = self.counts[name].astype(np.float32).reshape(-1, 1)
            specs += [TensorSpec(name + ".in_sum2", s.shape, 0), TensorSpec(name + ".counts", c.shape, 0)]
            data += [s, c]
        w = GGUFStreamWriter(path, md, specs, fingerprint_extra=self.fingerprint())
        by_name = dict(zip((s.name for s in specs), data))
        try:
            with w:
                for spec, _ in w.remaining():
                    w.write(np.ascontiguousarray(by_name[spec.name]))
                w.finish()
        except BaseException:
            w.discard()  # written in one go: a failed write leaves nothing to resume, so nothing at all
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> "IMatrix":
        """Read a GGUF imatrix (llama-imatrix or ours) or a legacy llama.cpp .dat imatrix."""
        path = Path(path)
        if not path.is_file():
            raise K2Error(f"{path}: imatrix file not found")
        with open(path, "rb") as f:
            magic = f.read(4)
        try:
            return cls._load_gguf(path) if magic == b"GGUF" else cls._load_legacy(path)
        except K2Error:
            raise
        except Exception as e:  # noqa: BLE001 (any parse failure of a corrupt file)
            raise K2Error(f"{path}: not a valid imatrix file ({type(e).__name__}: {e})") from None

    @classmethod
    def _load_gguf(cls, path: Path) -> "IMatrix":
        from gguf import GGUFReader  # noqa: PLC0415

        r = GGUFReader(path, "r")
        fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.") and f.types}
        if fields.get("general.type") not in ("imatrix", None):
            raise K2Error(f"{path}: a GGUF of type {fields.get('general.type')!r}, not an imatrix")
        out = cls(datasets=list(fields.get("imatrix.datasets") or []),
                  chunk_count=int(fields.get("imatrix.chunk_count") or 0),
                  chunk_size=int(fields.get("imatrix.chunk_size") or 0))
        tens = {t.name: t for t in r.tensors}
        for name, t in tens.items():
            if not name.endswith(".in_sum2"):
                continue
            base = name[: -len(".in_sum2")]
            c = tens.get(base + ".counts")
            if c is None:
                raise K2Error(f"{path}: {name} has no matching {base}.counts")
            n_mat = int(np.asarray(c.data).size)
            s = np.asarray(t.data, dtype=np.float32).reshape(n_mat, -1)
            out.sums[base] = s.astype(np.float64)
            out.counts[base] = np.asarray(c.data, dtype=np.float64).reshape(-1)
        if not out.sums:
            raise K2Error(f"{path}: no imatrix entries (no *.in_sum2 tensors)")
        return out

    @classmethod
    def _load_legacy(cls, path: Path) -> "IMatrix":
        b = path.read_bytes()
        pos = 0

        def take(fmt: str):
            nonlocal pos
            vals = struct.unpack_from(fmt, b, pos)
            pos += struct.calcsize(fmt)
            return vals

        (n,) = take("<i")
        if not 0 < n < 1_000_000:
            raise K2Error(f"{path}: not an imatrix file (bad entry count {n})")
        out = cls()
        for _ in range(n):
            (ln,) = take("<i")
            name = b[pos:pos + ln].decode()
            pos += ln
            ncall, nval = take("<ii")
            vals = np.frombuffer(b, dtype="<f4", count=nval, offset=pos).astype(np.float64)
            pos += 4 * nval
            # legacy files hold mean(x^2) * ncall over all matrices; weights() divides by the count again
            out.sums[name] = vals.reshape(1, -1)
            out.counts[name] = np.array([float(max(ncall, 1))])
        if pos + 4 <= len(b):
            (out.chunk_count,) = take("<i")
            if pos + 4 <= len(b):
                (ln,) = take("<i")
                out.datasets = [b[pos:pos + ln].decode(errors="replace")]
        return out

    def reshape_for(self, name: str, n_mat: int) -> None:
        """Legacy entries are flat: split one into `n_mat` matrices (experts) once its tensor is known."""
        s = self.sums.get(name)
        if s is not None and s.shape[0] == 1 and n_mat > 1 and s.shape[1] % n_mat == 0:
            self.sums[name] = s.reshape(n_mat, -1)
            self.counts[name] = np.repeat(self.counts[name], n_mat)


# ----------------------------------------------------------------------------------------------------- collection
class _Recorder:
    """A k2local.linear observer: records the inputs of every named weight."""

    def __init__(self, names: dict[int, str],
                 extra: dict[int, Callable[[torch.Tensor, torch.Tensor], None]], imat: IMatrix):
        self.names, self.extra, self.imat = names, extra, imat

    def __call__(self, x: torch.Tensor, w, out: torch.Tensor) -> None:
        name = self.names.get(id(w))
        if name is not None:
            x2 = x.reshape(-1, x.shape[-1]).double()
            self.imat.add(name, (x2 * x2).sum(0, keepdim=True).numpy(), x2.shape[0])
        hook = self.extra.get(id(w))
        if hook is not None:
            hook(x, out)


class _RecordingExperts:
    """Wraps an ExpertBackend: per expert, the squared inputs of gate/up and of down."""

    def __init__(self, inner, source, imat: IMatrix, n_expert: int):
        self.inner, self.source, self.imat, self.n_expert = inner, source, imat, n_expert

    def _weights(self, layer: int, e: int):
        """(gate, up, down) of one expert: the dense backend's tensors, else dequantized from the source."""
        ex = getattr(self.inner, "experts", None)
        if isinstance(ex, dict) and layer in ex:
            return ex[layer][e]
        from k2local.weights.hf_checkpoint import expert_name  # noqa: PLC0415

        return tuple(self.source.get(expert_name(layer, e, p)) for p in ("gate", "up", "down"))

    def forward(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        cols, inter = x.shape[-1], None
        sq_in = np.zeros((self.n_expert, cols))
        cnt = np.zeros(self.n_expert)
        sq_mid: np.ndarray | None = None
        for e in idx.unique().tolist():
            tok = (idx == e).any(-1).nonzero(as_tuple=True)[0]
            xe = x[tok].double()
            g, u, d = self._weights(layer, e)
            h = (F.silu(linear(x[tok], g)) * linear(x[tok], u)).double()
            if sq_mid is None:
                inter = h.shape[-1]
                sq_mid = np.zeros((self.n_expert, inter))
            sq_in[e] = (xe * xe).sum(0).numpy()
            sq_mid[e] = (h * h).sum(0).numpy()
            cnt[e] = tok.numel()
        for proj in ("gate", "up"):
            self.imat.add(f"blk.{layer}.ffn_{proj}_exps.weight", sq_in, cnt)
        if sq_mid is not None:
            self.imat.add(f"blk.{layer}.ffn_down_exps.weight", sq_mid, cnt)
        return self.inner.forward(layer, x, idx, w)


def _linear_names(model, imat: IMatrix) -> tuple[dict[int, str], dict[int, Callable]]:
    """Map weight tensor ids of a KimiK2Model to GGUF names; hooks for attn_k_b / attn_v_b statistics."""
    from k2local.model import rms_norm  # noqa: PLC0415

    cfg = model.cfg
    names: dict[int, str] = {id(model.lm_head): "output.weight"} if model.lm_head is not model.embed else {}
    extra: dict[int, Callable] = {}
    nh, nope, rope, kvr = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank

    for i, lw in enumerate(model.layers):
        b = f"blk.{i}."
        for attr, g in (("q_proj", "attn_q"), ("q_a", "attn_q_a"), ("q_b", "attn_q_b"),
                        ("kv_a", "attn_kv_a_mqa"), ("o_proj", "attn_output")):
            t = getattr(lw, attr)
            if t is not None:
                names[id(t)] = b + g + ".weight"
        if lw.dense is not None:
            for t, g in zip(lw.dense, ("ffn_gate", "ffn_up", "ffn_down")):
                names[id(t)] = b + g + ".weight"
        if lw.shared is not None:
            for t, g in zip(lw.shared, ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")):
                names[id(t)] = b + g + ".weight"

        def q_hook(x: torch.Tensor, out: torch.Tensor, b: str = b) -> None:
            q = out.reshape(-1, nh, nope + rope)[..., :nope].double()  # what attn_k_b multiplies, per head
            imat.add(b + "attn_k_b.weight", (q * q).sum(0).numpy(), q.shape[0])

        def kv_hook(x: torch.Tensor, out: torch.Tensor, b: str = b, lw=lw) -> None:
            c = rms_norm(out[..., :kvr], lw.kv_a_norm, cfg.rms_norm_eps).reshape(-1, kvr).double()
            sq = (c * c).sum(0).numpy()  # the latents attn_v_b is applied to (before attention averaging)
            imat.add(b + "attn_v_b.weight", np.repeat(sq[None], nh, 0), c.shape[0])

        extra[id(lw.q_b if lw.q_b is not None else lw.q_proj)] = q_hook
        extra[id(lw.kv_a)] = kv_hook
    return names, extra


def collect(model_path: str | Path, text: str, ctx: int = 512, max_chunks: int | None = None,
            progress: Callable[[int, int], None] | None = None, dataset: str = "") -> IMatrix:
    """Run the model at `model_path` over `text` in chunks of `ctx` tokens and return the statistics."""
    import k2local.model as kmodel  # noqa: PLC0415
    from k2local.weights.hf_checkpoint import open_checkpoint  # noqa: PLC0415
    from k2local.engine import load_tokenizer_and_template  # noqa: PLC0415
    from k2local.placement import DenseExperts  # noqa: PLC0415

    if ctx < 2:
        raise K2Error(f"context {ctx} too small for an imatrix run")
    src = open_checkpoint(model_path)
    tok, _ = load_tokenizer_and_template(src)
    ids = tok.encode(text, allow_special=False)
    if len(ids) < 2:
        raise K2Error("calibration text is empty (fewer than 2 tokens)")
    chunks = [ids[i:i + ctx] for i in range(0, len(ids), ctx)]
    chunks = [c for c in chunks if len(c) >= 2][: max_chunks or None]
    imat = IMatrix(datasets=[dataset] if dataset else [], chunk_size=ctx)
    experts = DenseExperts.from_source(src)
    model = kmodel.KimiK2Model(src, experts=_RecordingExperts(experts, src, imat, src.config.n_routed_experts))
    names, extra = _linear_names(model, imat)
    with observe_linear(_Recorder(names, extra, imat)):
        for k, c in enumerate(chunks):
            model.forward(c, model.new_cache(len(c)))
            imat.chunk_count += 1
            if progress:
                progress(k + 1, len(chunks))
    if not imat.sums:
        raise CheckpointError(f"{model_path}: no statistics were collected")
    return imat
