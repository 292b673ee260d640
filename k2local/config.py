"""Model configuration for Kimi K2 and its DeepSeek-V3-architecture siblings (config.json)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from k2local.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("kimi_k2", "deepseek_v3", "deepseek_v2", "kimi_vl")
RANDOM_WEIGHTS_KEY = "k2local.tiny"  # GGUF metadata key of a checkpoint from `k2local make-tiny` (its version)


@dataclass
class ModelConfig:
    """The fields of a DeepSeek-V3-style config.json that the forward pass needs."""

    model_type: str = "kimi_k2"
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 384
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 50000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 131072
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163585
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    num_nextn_predict_layers: int = 0
    quantization_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a config.json dict; a nested `text_config` (Kimi K2.5 style) is unwrapped."""
        multimodal = None
        if "text_config" in d and isinstance(d["text_config"], dict) and "hidden_size" not in d:
            outer = d
            d = dict(d["text_config"])
            multimodal = str(outer.get("model_type") or (outer.get("architectures") or ["multimodal"])[0])
            if "quantization_config" not in d and isinstance(outer.get("quantization_config"), dict):
                d["quantization_config"] = outer["quantization_config"]  # K2.5 keeps it beside text_config
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unsupported model_type {mt!r}; k2local runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        names = {f.name for f in fields(cls)} - {"extra"}
        kw = {k: v for k, v in d.items() if k in names}
        _check_fields(kw, source)
        cfg = cls(**kw, extra={k: v for k, v in d.items() if k not in names})
        if multimodal is not None:
            cfg.extra["k2local_multimodal"] = multimodal
        q = cfg.quantization_config
        if q is not None:
            method = q.get("quant_method") if isinstance(q, dict) else None
            if method not in (None, "fp8", "compressed-tensors"):
                raise CheckpointError(f"{source}: unsupported quantization_config quant_method {method!r} "
                                      "(k2local reads fp8 and compressed-tensors pack-quantized INT4)")
            if method == "compressed-tensors":
                from k2local.weights.sanitize import int4_scheme_problem  # noqa: PLC0415

                problem = int4_scheme_problem(q)
                if problem:
                    raise CheckpointError(f"{source}: unsupported quantization_config: {problem}")
        if cfg.scoring_func not in ("sigmoid", "softmax"):
            raise CheckpointError(f"{source}: unsupported scoring_func {cfg.scoring_func!r}")
        if cfg.hidden_act != "silu":
            raise CheckpointError(f"{source}: unsupported hidden_act {cfg.hidden_act!r}")
        if cfg.n_routed_experts % max(cfg.n_group, 1):
            raise CheckpointError(f"{source}: n_routed_experts not divisible by n_group")
        if cfg.rope_scaling is not None:
            kind = cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise CheckpointError(f"{source}: unsupported rope_scaling type {kind!r}")
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        """Read config.json from a checkpoint directory (or the file itself)."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.exists():
            raise CheckpointError(f"{p}: config.json not found")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{p}: expected a JSON object")
        try:
            return cls.from_dict(d, source=str(p))
        except TypeError as e:
            raise CheckpointError(f"{p}: bad field ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d

    # ------------------------------------------------------------------ derived
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def random_weights(self) -> bool:
        """Made by `k2local make-tiny` (config.json key "k2local_tiny", GGUF key RANDOM_WEIGHTS_KEY): its weights are
        random and it answers with nonsense."""
        return bool(self.extra.get("k2local_tiny"))

    @property
    def is_fp8(self) -> bool:
        q = self.quantization_config or {}
        return q.get("quant_method") == "fp8"

    @property
    def is_int4(self) -> bool:
        """compressed-tensors pack-quantized INT4 routed experts (Kimi K2 Thinking, K2.5)."""
        q = self.quantization_config or {}
        return q.get("quant_method") == "compressed-tensors" and q.get("format") == "pack-quantized"

    @property
    def multimodal(self) -> str | None:
        """The multimodal model this text config was nested in (Kimi K2.5), or None; k2local runs its text model
        only (images are not supported)."""
        return self.extra.get("k2local_multimodal")

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.n_routed_experts > 0
            and i >= self.first_k_dense_replace
            and i % max(self.moe_layer_freq, 1) == 0
        )

    @property
    def stop_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else ([e] if isinstance(e, int) else list(e))

    def _yarn(self) -> dict[str, Any] | None:
        rs = self.rope_scaling
        if not rs or rs.get("type", rs.get("rope_type")) != "yarn":
            return None
        return rs

    @property
    def llama_cpp_overrides(self) -> dict[str, float]:
        """Keyword arguments for llama_cpp.Llama that this model needs at load time: llama.cpp's deepseek2 loader
        does not read the YaRN betas from the GGUF (it would use 32/1 where Kimi K2 says 1/1)."""
        rs = self._yarn()
        if rs is None:
            return {}
        return {"yarn_beta_fast": float(rs.get("beta_fast") or 32), "yarn_beta_slow": float(rs.get("beta_slow") or 1)}

    @property
    def softmax_scale(self) -> float:
        """Attention scale: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim ** -0.5
        rs = self._yarn()
        if rs and rs.get("mscale_all_dim"):
            m = _yarn_mscale(float(rs["factor"]), float(rs["mscale_all_dim"]))
            scale *= m * m
        return scale

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Per-pair inverse frequencies (qk_rope_head_dim/2) and the cos/sin multiplier (YaRN aware)."""
        dim = self.qk_rope_head_dim
        base = float(self.rope_theta)
        pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        extra = 1.0 / pos
        rs = self._yarn()
        if rs is None:
            return extra, 1.0
        factor = float(rs.get("factor") or self.max_position_embeddings / rs["original_max_position_embeddings"])
        orig = float(rs["original_max_position_embeddings"])
        beta_fast = float(rs.get("beta_fast") or 32)
        beta_slow = float(rs.get("beta_slow") or 1)
        mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all:
            attn = _yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
        else:
            attn = _yarn_mscale(factor, 1.0)

        def corr_dim(rot: float) -> float:
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr_dim(beta_fast)), 0)
        high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp  # 1 = extrapolate (original freq), 0 = interpolate (freq / factor)
        inv = (extra / factor) * (1 - keep) + extra * keep
        return inv, float(attn)


# config.json fields by the values they may take; one bad value is a CheckpointError naming the file and field
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group", "moe_layer_freq",
                  "max_position_embeddings")
# 0 allowed (a GGUF of a model without dense layers or experts has no such length)
_COUNTS = ("intermediate_size", "moe_intermediate_size", "num_experts_per_tok", "n_routed_experts",
           "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers")
_POSITIVE_FLOATS = ("routed_scaling_factor", "rms_norm_eps", "rope_theta")
_BOOLS = ("norm_topk_prob", "tie_word_embeddings")
_STRINGS = ("model_type", "topk_method", "scoring_func", "hidden_act")
_DICTS = ("rope_scaling", "quantization_config")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_fields(kw: dict[str, Any], source: str) -> None:
    """Each known config.json field has the type and range the model needs (one place for all of them)."""

    def bad(name: str, want: str) -> CheckpointError:
        return CheckpointError(f"{source}: field {name!r} must be {want}, not {kw[name]!r}")

    for name, v in kw.items():
        if name in _POSITIVE_INTS and not (_is_int(v) and v >= 1):
            raise bad(name, "a positive integer")
        if name in _COUNTS and not (_is_int(v) and v >= 0):
            raise bad(name, "an integer of 0 or more")
        if name == "q_lora_rank" and not (v is None or (_is_int(v) and v >= 1)):
            raise bad(name, "null or a positive integer")
        if name in _POSITIVE_FLOATS and not (isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v) and v > 0):
            raise bad(name, "a positive number")
        if name in _BOOLS and not isinstance(v, bool):
            raise bad(name, "true or false")
        if name in _STRINGS and not isinstance(v, str):
            raise bad(name, "a string")
        if name in _DICTS and not (v is None or isinstance(v, dict)):
            raise bad(name, "null or an object")
        if name == "bos_token_id" and not (v is None or (_is_int(v) and v >= 0)):
            raise bad(name, "null or a token id")
        if name == "eos_token_id" and not (v is None or (_is_int(v) and v >= 0) or (
                isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v))):
            raise bad(name, "null, a token id or a list of token ids")
    experts, k = kw.get("n_routed_experts"), kw.get("num_experts_per_tok")
    if experts and k is not None and not 1 <= k <= experts:
        raise bad("num_experts_per_tok", f"between 1 and n_routed_experts ({experts})")
    groups, topk_groups = kw.get("n_group"), kw.get("topk_group")
    if groups is not None and topk_groups is not None and topk_groups > groups:
        raise bad("topk_group", f"at most n_group ({groups})")


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
