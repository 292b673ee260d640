"""GGUF checkpoints (ours, llama.cpp's, Unsloth's; single or split) as a `WeightSource` with canonical HF names.

Everything is memory-mapped; nothing is read until asked for. `get` dequantizes one tensor (re-merging
`attn_k_b`/`attn_v_b` into `kv_b_proj`, or reading a legacy `attn_kv_b`; slicing one expert out of the stacked
`ffn_*_exps`), `expert_tensor` hands the offload executor the stacked experts' quantized bytes without a copy, and
`tokenizer_and_template` rebuilds the tokenizer and chat template from the GGUF metadata.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, Keys

from k2local import arch
from k2local.arch import expected_tensor_names
from k2local.config import RANDOM_WEIGHTS_KEY, ModelConfig
from k2local.errors import CheckpointError
from k2local.tokenizer.gguf_vocab import tokenizer_and_template_from_gguf
from k2local.weights import sanitize
from quant.gguf_file import GGUFFormatError, TensorSpec, dequantize_rows, qtype_of, split_parts

ARCHES = (arch.ARCH_NAME,)
_T = arch.MODEL_TENSOR


@dataclass(frozen=True)
class GGUFTensor(TensorSpec):
    """Where one GGUF tensor's bytes are: part index and absolute offset (name, torch-order shape, ggml type
    and the row geometry come from TensorSpec)."""

    part: int = 0
    offset: int = 0


def _field_value(field: Any) -> Any:
    return field.contents() if field.types else None


def find_gguf(path: Path) -> Path:
    """The GGUF file to open for `path`: the file itself, or the single model (first split) in a directory."""
    if path.is_file():
        return path
    files = sorted(p for p in path.glob("*.gguf") if not p.name.endswith(".partial"))
    firsts = [p for p in files if re.search(r"-00001-of-\d{5}\.gguf$", p.name)]
    singles = [p for p in files if not re.search(r"-\d{5}-of-\d{5}\.gguf$", p.name)]
    cands = firsts + singles
    if len(cands) != 1:
        what = "no .gguf file" if not cands else f"{len(cands)} GGUF models ({', '.join(p.name for p in cands)})"
        raise CheckpointError(f"{path}: {what}; pass the .gguf file itself")
    return cands[0]


class GGUFSource:
    """A GGUF model (all split parts) as a WeightSource: HF tensor names, dequantized on request."""

    def __init__(self, path: str | Path):
        p = find_gguf(Path(path))
        parts = split_parts(p)
        for q in parts:
            if not q.exists():
                raise CheckpointError(f"{q}: split part missing (model {p.name} has {len(parts)} parts)")
        self.path = parts[0]
        self.parts = parts
        self._readers: list[GGUFReader] = []
        self.tensors: dict[str, GGUFTensor] = {}
        for i, q in enumerate(parts):
            r = self._open_part(q)
            self._readers.append(r)
            size = q.stat().st_size
            for t in r.tensors:
                shape = tuple(int(d) for d in reversed(list(t.shape)))
                try:
                    gt = GGUFTensor(t.name, shape, int(t.tensor_type), part=i, offset=int(t.data_offset))
                    end = gt.offset + gt.nbytes
                except (GGUFFormatError, KeyError, ValueError) as e:
                    raise CheckpointError(f"{q}: tensor {t.name}: unsupported type or shape ({e})") from None
                if end > size:
                    raise CheckpointError(f"{q}: truncated (tensor {t.name} ends at byte {end}, file has {size})")
                if t.name in self.tensors:
                    raise CheckpointError(f"{q}: tensor {t.name} appears twice")
                self.tensors[t.name] = gt
        self.meta: dict[str, Any] = {k: _field_value(f) for k, f in self._readers[0].fields.items()
                                     if not k.startswith("GGUF.")}
        n_split = self.meta.get("split.count")
        if n_split is not None and int(n_split) != len(parts):
            raise CheckpointError(f"{self.path}: says it has {n_split} split parts, found {len(parts)} by name")
        want = self.meta.get("split.tensors.count")
        if want is not None and int(want) != len(self.tensors):
            raise CheckpointError(f"{self.path}: {len(self.tensors)} tensors across {len(parts)} parts, "
                                  f"metadata says {want} (a part is missing or from another model)")
        self.config = config_from_gguf(self.meta, self.tensors, str(self.path))
        self._check_tensors()

    @staticmethod
    def _open_part(q: Path) -> GGUFReader:
        try:
            with open(q, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise CheckpointError(f"{q}: not a GGUF file (bad magic)")
            return GGUFReader(q, "r")
        except CheckpointError:
            raise
        except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on corrupt input
            msg = str(e)
            if any(s in msg for s in ("cannot reshape", "out of bounds", "unpack requires", "buffer is smaller",
                                        "larger dtype")):
                size = q.stat().st_size if q.exists() else 0
                raise CheckpointError(f"{q}: truncated GGUF file ({size:,} bytes, less than its header describes); "
                                      "download or convert it again") from None
            raise CheckpointError(f"{q}: not a valid GGUF file ({msg})") from None

    def _check_tensors(self) -> None:
        missing = [n for n in expected_tensor_names(self.config) if not self.has(n)]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise CheckpointError(f"{self.path}: missing tensor(s) for {', '.join(missing[:3])}{more}")

    # ------------------------------------------------------------------------------------------ name resolution
    def _locate(self, name: str) -> tuple[str, Any]:
        """HF name -> ("plain", gguf name) | ("kv_b", layer) | ("expert", (layer, expert, proj)) | ("none", None)."""
        p = arch.parse_hf_name(name)
        if p is None:
            return "none", None
        if p.tensor.role is arch.Role.ROUTED_EXPERT:
            return "expert", (p.layer, p.expert, p.proj)
        if p.key == _T.ATTN_KV_B:
            return "kv_b", p.layer
        g = p.tensor.gguf_name(p.layer)
        if p.key == _T.OUTPUT and g not in self.tensors:
            g = arch.gguf_name(_T.TOKEN_EMBD)  # tied embeddings
        return "plain", g

    def _expert_loc(self, layer: int, proj: str) -> tuple[GGUFTensor, int, int]:
        """(stacked tensor, first row, rows) of `proj` in `layer` (handles fused gate_up)."""
        found = sanitize.find_stacked_experts(self.tensors, layer, proj)
        if found is None:
            raise CheckpointError(f"{self.path}: no experts for layer {layer} ({proj})")
        return found

    def _kv_b_parts(self, layer: int) -> tuple[GGUFTensor, GGUFTensor] | None:
        """attn_k_b, attn_v_b of `layer` (None when the file does not have both)."""
        kt = self.tensors.get(arch.gguf_name(_T.ATTN_K_B, layer))
        vt = self.tensors.get(arch.gguf_name(_T.ATTN_V_B, layer))
        return None if kt is None or vt is None else (kt, vt)

    def has(self, name: str) -> bool:
        kind, key = self._locate(name)
        if kind == "plain":
            return key in self.tensors
        if kind == "kv_b":
            return self._kv_b_parts(key) is not None or arch.gguf_name(_T.ATTN_KV_B, key) in self.tensors
        if kind == "expert":
            layer, e, proj = key
            try:
                t, _, _ = self._expert_loc(layer, proj)
            except CheckpointError:
                return False
            return e < t.shape[0]
        return False

    # ------------------------------------------------------------------------------------------------ raw bytes
    def _bytes(self, t: GGUFTensor) -> np.ndarray:
        """The tensor's bytes as uint8 [..., row_bytes] (a memmap view, no copy)."""
        data = self._readers[t.part].data
        flat = data[t.offset: t.offset + t.nbytes]
        return flat.reshape(*t.shape[:-1], t.row_bytes) if len(t.shape) > 1 else flat.reshape(1, t.row_bytes)

    def _dequant(self, t: GGUFTensor, raw: np.ndarray | None = None) -> torch.Tensor:
        raw = self._bytes(t) if raw is None else raw
        try:
            arr = dequantize_rows(raw, t.qtype, t.cols)
        except (GGUFFormatError, NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{self.parts[t.part]}: cannot decode {t.name} "
                                  f"({qtype_of(t.qtype).name}): {e}") from None
        return torch.from_numpy(np.ascontiguousarray(arr))

    def quantized(self, name: str) -> tuple[np.ndarray, int, tuple[int, ...]]:
        """(uint8 view [..., row_bytes], ggml type, torch shape) of a plain (not kv_b / expert) HF tensor."""
        kind, key = self._locate(name)
        if kind != "plain" or key not in self.tensors:
            raise CheckpointError(f"{self.path}: no plain tensor for {name}")
        t = self.tensors[key]
        return self._bytes(t), t.qtype, t.shape

    def quantized_kv_b(self, layer: int) -> tuple[tuple[np.ndarray, int], tuple[np.ndarray, int]] | None:
        """MLA's absorbed per-head matrices as stored: ((k_b bytes [heads * kv_lora, row_bytes], type),
        (v_b bytes [heads * v_dim, row_bytes], type)); k_b rows run over the no-rope key dims, v_b rows over
        kv_lora. None for a legacy merged attn_kv_b."""
        parts = self._kv_b_parts(layer)
        if parts is None:
            return None
        kt, vt = parts
        return ((self._bytes(kt).reshape(-1, kt.row_bytes), kt.qtype), (self._bytes(vt).reshape(-1, vt.row_bytes), vt.qtype))

    def expert_tensor(self, layer: int, proj: str) -> tuple[np.ndarray, int, int, int]:
        """Stacked routed experts of `layer`: (uint8 memmap [n_expert, rows, row_bytes], ggml type, rows, cols)."""
        if proj not in ("gate", "up", "down"):
            raise ValueError(f"proj must be gate, up or down, not {proj!r}")
        t, r0, rows = self._expert_loc(layer, proj)
        return self._bytes(t)[:, r0:r0 + rows], t.qtype, rows, t.cols

    # ---------------------------------------------------------------------------------------- WeightSource API
    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        kind, key = self._locate(name)
        if kind == "plain" and key in self.tensors:
            t = self.tensors[key]
            out = self._dequant(t).reshape(t.shape)
        elif kind == "kv_b" and self.has(name):
            out = self._kv_b(key)
        elif kind == "expert" and self.has(name):
            layer, e, proj = key
            raw, qt, rows, cols = self.expert_tensor(layer, proj)
            t = self._expert_loc(layer, proj)[0]
            out = self._dequant(t, raw[e]).reshape(rows, cols)
        else:
            raise CheckpointError(f"{self.path}: tensor {name} not in checkpoint")
        return out.to(dtype)

    def get_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of a 2-D plain tensor as float32 (reads only those rows)."""
        kind, key = self._locate(name)
        t = self.tensors.get(key) if kind == "plain" else None
        if t is None or len(t.shape) != 2:
            return self.get(name)[r0:r1]
        return self._dequant(t, self._bytes(t)[r0:r1])

    def _kv_b(self, layer: int) -> torch.Tensor:
        cfg = self.config
        parts = self._kv_b_parts(layer)
        if parts is None:
            legacy = self.tensors[arch.gguf_name(_T.ATTN_KV_B, layer)]
            return self._dequant(legacy).reshape(legacy.shape)
        kt, vt = parts
        nh, nope, vd, kvr = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        k = self._dequant(kt).reshape(nh, kvr, nope)
        v = self._dequant(vt).reshape(nh, vd, kvr)
        return sanitize.merge_kv_b(k, v)

    def shape(self, name: str) -> tuple[int, ...]:
        kind, key = self._locate(name)
        cfg = self.config
        if kind == "plain" and key in self.tensors:
            return self.tensors[key].shape
        if kind == "kv_b":
            return arch.BY_KEY[_T.ATTN_KV_B].shape(cfg)
        if kind == "expert":
            _, _, rows, cols = self.expert_tensor(key[0], key[2])
            return (rows, cols)
        raise CheckpointError(f"{self.path}: tensor {name} not in checkpoint")

    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies in the file (its share of a stacked or split tensor)."""
        kind, key = self._locate(name)
        if kind == "plain" and key in self.tensors:
            return self.tensors[key].nbytes
        if kind == "kv_b":
            parts = self._kv_b_parts(key)
            if parts is not None:
                return parts[0].nbytes + parts[1].nbytes
            return self.tensors[arch.gguf_name(_T.ATTN_KV_B, key)].nbytes
        if kind == "expert":
            t, _, rows = self._expert_loc(key[0], key[2])
            return rows * t.row_bytes
        raise CheckpointError(f"{self.path}: tensor {name} not in checkpoint")

    def names(self):
        return (n for n in expected_tensor_names(self.config) if self.has(n))

    def tensor_type(self, name: str) -> str:
        """ggml type name a HF tensor is stored in (e.g. 'Q4_K')."""
        kind, key = self._locate(name)
        if kind == "plain":
            return qtype_of(self.tensors[key].qtype).name
        if kind == "kv_b":
            parts = self._kv_b_parts(key)
            t = parts[0] if parts is not None else self.tensors[arch.gguf_name(_T.ATTN_KV_B, key)]
            return qtype_of(t.qtype).name
        if kind == "expert":
            return qtype_of(self._expert_loc(key[0], key[2])[0].qtype).name
        raise CheckpointError(f"{self.path}: tensor {name} not in checkpoint")

    # ------------------------------------------------------------------------------------ tokenizer, template
    def tokenizer_and_template(self):
        """(tokenizer, ChatTemplate) from tokenizer.ggml.* and tokenizer.chat_template (k2local.tokenizer.gguf_vocab)."""
        return tokenizer_and_template_from_gguf(self.meta, str(self.path))


# -------------------------------------------------------------------------------------------------------- config
def config_from_gguf(meta: dict[str, Any], tensors: dict[str, GGUFTensor], where: str) -> ModelConfig:
    """Rebuild a ModelConfig from deepseek2 GGUF metadata (model_type kimi_k2 when the tokenizer is Kimi's)."""
    arch_name = meta.get(Keys.General.ARCHITECTURE)
    if arch_name not in ARCHES:
        raise CheckpointError(f"{where}: architecture {arch_name!r} is not supported (k2local runs deepseek2: "
                              "Kimi K2, DeepSeek-V3 and their family)")

    def g(key: str, default: Any = None, required: bool = False) -> Any:
        k = key.format(arch=arch_name)
        if k not in meta:
            if required:
                raise CheckpointError(f"{where}: metadata key {k} missing")
            return default
        return meta[k]

    emb = tensors.get(arch.gguf_name(_T.TOKEN_EMBD))
    n_layers = int(g(Keys.LLM.BLOCK_COUNT, required=True))
    heads = int(g(Keys.Attention.HEAD_COUNT, required=True))
    kvr = int(g(Keys.Attention.KV_LORA_RANK, required=True))
    rope = int(g(Keys.Rope.DIMENSION_COUNT, required=True))
    k_mla, v_mla = g(Keys.Attention.KEY_LENGTH_MLA), g(Keys.Attention.VALUE_LENGTH_MLA)
    if k_mla is None:  # older GGUFs: key/value_length are the MLA head sizes
        k_mla, v_mla = g(Keys.Attention.KEY_LENGTH, required=True), g(Keys.Attention.VALUE_LENGTH, required=True)
    q_lora = g(Keys.Attention.Q_LORA_RANK)
    vocab = g(Keys.LLM.VOCAB_SIZE) or (emb.shape[0] if emb else None) or len(meta.get(Keys.Tokenizer.LIST) or [])
    gating = int(g(Keys.LLM.EXPERT_GATING_FUNC, 1))
    if gating not in (1, 2):
        raise CheckpointError(f"{where}: expert_gating_func {gating} not supported (softmax=1, sigmoid=2)")
    bias = arch.BY_KEY[_T.FFN_EXP_PROBS_B]
    has_bias = any(bias.gguf_name(i) in tensors for i in range(n_layers))
    d: dict[str, Any] = dict(
        model_type="kimi_k2" if meta.get(Keys.Tokenizer.PRE) == "kimi-k2" else "deepseek_v3",
        vocab_size=int(vocab), hidden_size=int(g(Keys.LLM.EMBEDDING_LENGTH, required=True)),
        intermediate_size=int(g(Keys.LLM.FEED_FORWARD_LENGTH, 0)),
        moe_intermediate_size=int(g(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH, 0)),
        num_hidden_layers=n_layers, num_attention_heads=heads,
        q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=kvr,
        qk_nope_head_dim=int(k_mla) - rope, qk_rope_head_dim=rope, v_head_dim=int(v_mla),
        n_routed_experts=int(g(Keys.LLM.EXPERT_COUNT, 0)), n_shared_experts=int(g(Keys.LLM.EXPERT_SHARED_COUNT, 0)),
        num_experts_per_tok=int(g(Keys.LLM.EXPERT_USED_COUNT, 0)),
        n_group=int(g(Keys.LLM.EXPERT_GROUP_COUNT, 1) or 1),
        topk_group=int(g(Keys.LLM.EXPERT_GROUP_USED_COUNT, 1) or 1),
        topk_method="noaux_tc" if has_bias else "greedy",
        routed_scaling_factor=float(g(Keys.LLM.EXPERT_WEIGHTS_SCALE, 1.0)),
        norm_topk_prob=bool(g(Keys.LLM.EXPERT_WEIGHTS_NORM, False)),
        scoring_func="sigmoid" if gating == 2 else "softmax",
        first_k_dense_replace=int(g(Keys.LLM.LEADING_DENSE_BLOCK_COUNT, 0)),
        rms_norm_eps=float(g(Keys.Attention.LAYERNORM_RMS_EPS, 1e-6)),
        rope_theta=float(g(Keys.Rope.FREQ_BASE, 10000.0)),
        max_position_embeddings=int(g(Keys.LLM.CONTEXT_LENGTH, 4096)),
        bos_token_id=meta.get(Keys.Tokenizer.BOS_ID), eos_token_id=meta.get(Keys.Tokenizer.EOS_ID),
        tie_word_embeddings=arch.gguf_name(_T.OUTPUT) not in tensors,
    )
    if g(Keys.Rope.SCALING_TYPE) == "yarn":
        log_mul = g(Keys.Rope.SCALING_YARN_LOG_MUL)
        d["rope_scaling"] = {
            "type": "yarn", "factor": float(g(Keys.Rope.SCALING_FACTOR, 1.0)),
            "original_max_position_embeddings": int(g(Keys.Rope.SCALING_ORIG_CTX_LEN, d["max_position_embeddings"])),
            "beta_fast": float(g(Keys.Rope.SCALING_YARN_BETA_FAST, 32.0)),
            "beta_slow": float(g(Keys.Rope.SCALING_YARN_BETA_SLOW, 1.0)),
        }
        if log_mul:  # stored as 0.1 * mscale_all_dim (llama.cpp assumes mscale == mscale_all_dim)
            m_all = round(float(log_mul) / 0.1, 6)
            d["rope_scaling"].update(mscale=m_all, mscale_all_dim=m_all)
    for key in ("bos_token_id", "eos_token_id"):
        if d[key] is not None:
            d[key] = int(d[key])
    if meta.get(RANDOM_WEIGHTS_KEY):  # converted from a make-tiny checkpoint: random weights
        d["k2local_tiny"] = int(meta[RANDOM_WEIGHTS_KEY])
    try:
        return ModelConfig.from_dict(d, source=where)
    except TypeError as e:
        raise CheckpointError(f"{where}: bad metadata ({e})") from None
