"""The deepseek2 tensor schema as data: every tensor of a Kimi K2 / DeepSeek-V3-family model, in two tables.

`HF_TENSORS` is the Hugging Face checkpoint's side, in the order its index lists a layer: the HF name pattern
(`{bid}` = layer, `{xid}` = routed expert), gguf-py's `MODEL_TENSOR` key for it (so the GGUF name comes from
`gguf.TENSOR_NAMES`, not from strings typed here), its role, its shape as a function of the config, and which
layers have it. `GGUF_TENSORS` is the GGUF file's side, in the order llama.cpp's converter writes a layer: each
GGUF tensor names the HF tensor it is built from and how (as is; routed experts stacked; `kv_b_proj` split into
MLA's absorbed `attn_k_b` / `attn_v_b`: the quirks themselves are in k2local.weights.sanitize).

Everything else (the loaders' name mapping, the converter's tensor plan, the tiny checkpoint generator, the
expected-tensor check and the resident byte counts) is derived from these two tables by the functions below.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Iterator

from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

from k2local.config import ModelConfig

ARCH = MODEL_ARCH.DEEPSEEK2
ARCH_NAME: str = MODEL_ARCH_NAMES[ARCH]  # "deepseek2"

Shape = Callable[[ModelConfig], tuple[int, ...]]
When = Callable[[ModelConfig, int], bool]  # (config, layer; -1 for the tensors outside the layers)


class Role(str, enum.Enum):
    """What a tensor is for (the planner sizes residency by role, the recipes pick types by it)."""

    EMBEDDING = "embedding"
    HEAD = "head"
    NORM = "norm"
    ATTENTION = "attention"
    DENSE_FFN = "dense FFN"
    SHARED_EXPERT = "shared expert"
    ROUTED_EXPERT = "routed expert"
    ROUTER = "router"


class Build(str, enum.Enum):
    """How a GGUF tensor is made from its HF tensor (k2local.weights.sanitize does it)."""

    PLAIN = "plain"  # the same matrix
    EXPERTS = "experts"  # every routed expert of the layer stacked: [n_expert, rows, cols]
    K_B = "k_b"  # kv_b_proj's key half per head, transposed: [heads, kv_lora, nope]
    V_B = "v_b"  # kv_b_proj's value half per head: [heads, v, kv_lora]


# ------------------------------------------------------------------------------------------------- conditions
def _always(cfg: ModelConfig, i: int) -> bool:
    return True


def _untied(cfg: ModelConfig, i: int) -> bool:
    return not cfg.tie_word_embeddings


def _q_plain(cfg: ModelConfig, i: int) -> bool:
    return cfg.q_lora_rank is None


def _q_lora(cfg: ModelConfig, i: int) -> bool:
    return cfg.q_lora_rank is not None


def _dense(cfg: ModelConfig, i: int) -> bool:
    return not cfg.is_moe_layer(i)


def _moe(cfg: ModelConfig, i: int) -> bool:
    return cfg.is_moe_layer(i)


def _moe_bias(cfg: ModelConfig, i: int) -> bool:
    return cfg.is_moe_layer(i) and cfg.topk_method == "noaux_tc"


def _moe_shared(cfg: ModelConfig, i: int) -> bool:
    return cfg.is_moe_layer(i) and bool(cfg.n_shared_experts)


# ----------------------------------------------------------------------------------------------------- shapes
def _q_rows(c: ModelConfig) -> int:
    return c.num_attention_heads * c.qk_head_dim


def _shared_inter(c: ModelConfig) -> int:
    return c.moe_intermediate_size * c.n_shared_experts


@dataclass(frozen=True)
class TensorDef:
    """One tensor of the HF checkpoint (routed experts: one expert's matrix)."""

    key: MODEL_TENSOR  # gguf-py's id; TENSOR_NAMES[key] is its GGUF base name
    hf: str  # HF name pattern: {bid} layer, {xid} routed expert
    role: Role
    shape: Shape  # torch order ([rows, cols] or [n])
    when: When = _always
    suffix: str = "weight"  # of the GGUF name: "weight" or "bias"

    @property
    def per_expert(self) -> bool:
        return "{xid}" in self.hf

    def gguf_name(self, bid: int | None = None) -> str:
        """gguf-py's name for this tensor's key (routed experts: the stacked tensor; kv_b: legacy attn_kv_b)."""
        return gguf_name(self.key, bid, self.suffix)


_T = MODEL_TENSOR
_L = "model.layers.{bid}."
_A = _L + "self_attn."
_M = _L + "mlp."

# Top-level tensors, in checkpoint order.
HF_TOP: tuple[TensorDef, ...] = (
    TensorDef(_T.TOKEN_EMBD, "model.embed_tokens.weight", Role.EMBEDDING, lambda c: (c.vocab_size, c.hidden_size)),
    TensorDef(_T.OUTPUT_NORM, "model.norm.weight", Role.NORM, lambda c: (c.hidden_size,)),
    TensorDef(_T.OUTPUT, "lm_head.weight", Role.HEAD, lambda c: (c.vocab_size, c.hidden_size), _untied),
)

# One decoder layer's tensors, in checkpoint order (routed experts are listed expert by expert: gate, up, down).
HF_LAYER: tuple[TensorDef, ...] = (
    TensorDef(_T.ATTN_NORM, _L + "input_layernorm.weight", Role.NORM, lambda c: (c.hidden_size,)),
    TensorDef(_T.FFN_NORM, _L + "post_attention_layernorm.weight", Role.NORM, lambda c: (c.hidden_size,)),
    TensorDef(_T.ATTN_Q, _A + "q_proj.weight", Role.ATTENTION, lambda c: (_q_rows(c), c.hidden_size), _q_plain),
    TensorDef(_T.ATTN_Q_A, _A + "q_a_proj.weight", Role.ATTENTION,
              lambda c: (c.q_lora_rank, c.hidden_size), _q_lora),
    TensorDef(_T.ATTN_Q_A_NORM, _A + "q_a_layernorm.weight", Role.NORM, lambda c: (c.q_lora_rank,), _q_lora),
    TensorDef(_T.ATTN_Q_B, _A + "q_b_proj.weight", Role.ATTENTION, lambda c: (_q_rows(c), c.q_lora_rank), _q_lora),
    TensorDef(_T.ATTN_KV_A_MQA, _A + "kv_a_proj_with_mqa.weight", Role.ATTENTION,
              lambda c: (c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size)),
    TensorDef(_T.ATTN_KV_A_NORM, _A + "kv_a_layernorm.weight", Role.NORM, lambda c: (c.kv_lora_rank,)),
    TensorDef(_T.ATTN_KV_B, _A + "kv_b_proj.weight", Role.ATTENTION,
              lambda c: (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)),
    TensorDef(_T.ATTN_OUT, _A + "o_proj.weight", Role.ATTENTION,
              lambda c: (c.hidden_size, c.num_attention_heads * c.v_head_dim)),
    TensorDef(_T.FFN_GATE_INP, _M + "gate.weight", Role.ROUTER, lambda c: (c.n_routed_experts, c.hidden_size), _moe),
    TensorDef(_T.FFN_EXP_PROBS_B, _M + "gate.e_score_correction_bias", Role.ROUTER,
              lambda c: (c.n_routed_experts,), _moe_bias, suffix="bias"),
    TensorDef(_T.FFN_GATE_EXP, _M + "experts.{xid}.gate_proj.weight", Role.ROUTED_EXPERT,
              lambda c: (c.moe_intermediate_size, c.hidden_size), _moe),
    TensorDef(_T.FFN_UP_EXP, _M + "experts.{xid}.up_proj.weight", Role.ROUTED_EXPERT,
              lambda c: (c.moe_intermediate_size, c.hidden_size), _moe),
    TensorDef(_T.FFN_DOWN_EXP, _M + "experts.{xid}.down_proj.weight", Role.ROUTED_EXPERT,
              lambda c: (c.hidden_size, c.moe_intermediate_size), _moe),
    TensorDef(_T.FFN_GATE_SHEXP, _M + "shared_experts.gate_proj.weight", Role.SHARED_EXPERT,
              lambda c: (_shared_inter(c), c.hidden_size), _moe_shared),
    TensorDef(_T.FFN_UP_SHEXP, _M + "shared_experts.up_proj.weight", Role.SHARED_EXPERT,
              lambda c: (_shared_inter(c), c.hidden_size), _moe_shared),
    TensorDef(_T.FFN_DOWN_SHEXP, _M + "shared_experts.down_proj.weight", Role.SHARED_EXPERT,
              lambda c: (c.hidden_size, _shared_inter(c)), _moe_shared),
    TensorDef(_T.FFN_GATE, _M + "gate_proj.weight", Role.DENSE_FFN, lambda c: (c.intermediate_size, c.hidden_size),
              _dense),
    TensorDef(_T.FFN_UP, _M + "up_proj.weight", Role.DENSE_FFN, lambda c: (c.intermediate_size, c.hidden_size),
              _dense),
    TensorDef(_T.FFN_DOWN, _M + "down_proj.weight", Role.DENSE_FFN, lambda c: (c.hidden_size, c.intermediate_size),
              _dense),
)

HF_TENSORS: tuple[TensorDef, ...] = HF_TOP + HF_LAYER
BY_KEY: dict[MODEL_TENSOR, TensorDef] = {d.key: d for d in HF_TENSORS}
# In real checkpoints too, read by nobody (gguf-py's ATTN_ROT_EMBD, which llama.cpp's converter skips).
ROTARY_INV_FREQ = _A + "rotary_emb.inv_freq"

# Routed-expert projections: "gate" / "up" / "down" -> key.
EXPERT_PROJS: dict[str, MODEL_TENSOR] = {"gate": _T.FFN_GATE_EXP, "up": _T.FFN_UP_EXP, "down": _T.FFN_DOWN_EXP}
SHARED_PROJS: dict[str, MODEL_TENSOR] = {"gate": _T.FFN_GATE_SHEXP, "up": _T.FFN_UP_SHEXP, "down": _T.FFN_DOWN_SHEXP}
DENSE_PROJS: dict[str, MODEL_TENSOR] = {"gate": _T.FFN_GATE, "up": _T.FFN_UP, "down": _T.FFN_DOWN}
# Some GGUFs (llama.cpp's --fuse-gate-up-exps) hold gate and up of the routed experts as one tensor, gate first.
FUSED_GATE_UP_EXP: MODEL_TENSOR | None = getattr(MODEL_TENSOR, "FFN_GATE_UP_EXP", None)


@dataclass(frozen=True)
class GGUFDef:
    """One tensor of the GGUF file: its key, the HF tensor it is built from, and how."""

    key: MODEL_TENSOR
    source: MODEL_TENSOR  # key of the HF tensor (BY_KEY)
    build: Build = Build.PLAIN

    @property
    def src(self) -> TensorDef:
        return BY_KEY[self.source]

    @property
    def role(self) -> Role:
        return self.src.role

    @property
    def kind(self) -> str:
        """The recipe's tensor kind (k2local.convert.recipes.TensorRole.kind): the GGUF base name, "norm" for norms."""
        return "norm" if self.role is Role.NORM else TENSOR_NAMES[self.key].removeprefix("blk.{bid}.")

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Torch-order shape in the GGUF file ([n_expert | heads,] rows, cols)."""
        if self.build is Build.EXPERTS:
            return (cfg.n_routed_experts, *self.src.shape(cfg))
        if self.build is Build.K_B:
            return (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim)
        if self.build is Build.V_B:
            return (cfg.num_attention_heads, cfg.v_head_dim, cfg.kv_lora_rank)
        return self.src.shape(cfg)


def _g(key: MODEL_TENSOR, build: Build = Build.PLAIN, source: MODEL_TENSOR | None = None) -> GGUFDef:
    return GGUFDef(key, key if source is None else source, build)


GGUF_TOP_FIRST: tuple[GGUFDef, ...] = (_g(_T.TOKEN_EMBD),)
# One layer, in the order llama.cpp's converter writes it.
GGUF_LAYER: tuple[GGUFDef, ...] = (
    _g(_T.ATTN_NORM), _g(_T.ATTN_Q), _g(_T.ATTN_Q_A), _g(_T.ATTN_Q_A_NORM), _g(_T.ATTN_Q_B),
    _g(_T.ATTN_KV_A_MQA), _g(_T.ATTN_KV_A_NORM),
    _g(_T.ATTN_K_B, Build.K_B, _T.ATTN_KV_B), _g(_T.ATTN_V_B, Build.V_B, _T.ATTN_KV_B),
    _g(_T.ATTN_OUT), _g(_T.FFN_NORM),
    _g(_T.FFN_GATE), _g(_T.FFN_UP), _g(_T.FFN_DOWN),  # dense layers
    _g(_T.FFN_GATE_INP), _g(_T.FFN_EXP_PROBS_B),  # MoE layers
    _g(_T.FFN_GATE_EXP, Build.EXPERTS), _g(_T.FFN_UP_EXP, Build.EXPERTS), _g(_T.FFN_DOWN_EXP, Build.EXPERTS),
    _g(_T.FFN_GATE_SHEXP), _g(_T.FFN_UP_SHEXP), _g(_T.FFN_DOWN_SHEXP),
)
GGUF_TOP_LAST: tuple[GGUFDef, ...] = (_g(_T.OUTPUT_NORM), _g(_T.OUTPUT))
GGUF_TENSORS: tuple[GGUFDef, ...] = GGUF_TOP_FIRST + GGUF_LAYER + GGUF_TOP_LAST


# ------------------------------------------------------------------------------------------------------ names
def gguf_name(key: MODEL_TENSOR, bid: int | None = None, suffix: str = "weight") -> str:
    """gguf-py's name for `key` in layer `bid`, with the `.weight` / `.bias` suffix."""
    base = TENSOR_NAMES[key]
    return (base.format(bid=bid) if "{bid}" in base else base) + "." + suffix


def hf_name(key: MODEL_TENSOR, bid: int | None = None, xid: int | None = None) -> str:
    """The HF checkpoint name of `key` in layer `bid` (routed experts: expert `xid`)."""
    return BY_KEY[key].hf.format(bid=bid, xid=xid)


def expert_name(layer: int, expert: int, proj: str) -> str:
    """HF name of one routed expert matrix; proj is 'gate', 'up' or 'down'."""
    return hf_name(EXPERT_PROJS[proj], layer, expert)


def router_names(layer: int) -> tuple[str, str]:
    """HF names of a MoE layer's router weight and its selection bias (e_score_correction_bias)."""
    return hf_name(_T.FFN_GATE_INP, layer), hf_name(_T.FFN_EXP_PROBS_B, layer)


_BY_TEMPLATE: dict[str, TensorDef] = {d.hf: d for d in HF_TENSORS}


@dataclass(frozen=True)
class HFName:
    """A parsed HF tensor name."""

    tensor: TensorDef
    layer: int | None = None
    expert: int | None = None

    @property
    def key(self) -> MODEL_TENSOR:
        return self.tensor.key

    @property
    def proj(self) -> str | None:
        """'gate' / 'up' / 'down' for routed, shared and dense FFN matrices."""
        for projs in (EXPERT_PROJS, SHARED_PROJS, DENSE_PROJS):
            for p, k in projs.items():
                if k == self.key:
                    return p
        return None


def parse_hf_name(name: str) -> HFName | None:
    """The schema entry, layer and expert of an HF tensor name; None for names outside the schema (FP8 scales,
    rotary inv_freq, MTP-only tensors)."""
    parts = name.split(".")
    nums: list[int] = []
    for i, p in enumerate(parts):
        if p.isdigit():
            if len(nums) == 2:
                return None
            nums.append(int(p))
            parts[i] = "{bid}" if len(nums) == 1 else "{xid}"
    d = _BY_TEMPLATE.get(".".join(parts))
    if d is None:
        return None
    return HFName(d, nums[0] if nums else None, nums[1] if len(nums) > 1 else None)


def gguf_for_hf(name: str) -> tuple[str, ...]:
    """The GGUF tensors that llama.cpp's converter (and ours) builds from HF tensor `name`."""
    p = parse_hf_name(name)
    if p is None:
        return ()
    return tuple(gguf_name(g.key, p.layer, g.src.suffix) for g in GGUF_TENSORS if g.source == p.key)


_GGUF_TEMPLATE: dict[str, MODEL_TENSOR] = {f"{TENSOR_NAMES[k]}.{s}": k for k in MODEL_TENSORS[ARCH]
                                           for s in ("weight", "bias")}


def parse_gguf_name(name: str) -> tuple[MODEL_TENSOR, int | None, str] | None:
    """(key, layer, suffix) of a deepseek2 GGUF tensor name; None if gguf-py does not know it for deepseek2."""
    parts = name.split(".")
    bid = None
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        bid = int(parts[1])
        parts[1] = "{bid}"
    key = _GGUF_TEMPLATE.get(".".join(parts))
    return None if key is None else (key, bid, parts[-1])


def hf_for_gguf(name: str, cfg: ModelConfig) -> tuple[str, ...]:
    """The HF tensors that GGUF tensor `name` of a `cfg` model is built from (the inverse of gguf_for_hf)."""
    p = parse_gguf_name(name)
    if p is None:
        return ()
    key, bid, _ = p
    g = next((g for g in GGUF_TENSORS if g.key == key), None)
    src = g.src if g is not None else BY_KEY.get(key)  # BY_KEY: a legacy attn_kv_b (kv_b_proj unsplit)
    if src is None:
        return ()
    if src.per_expert:
        return tuple(src.hf.format(bid=bid, xid=e) for e in range(cfg.n_routed_experts))
    return (src.hf.format(bid=bid),)


# ------------------------------------------------------------------------------------------------ instances
@dataclass(frozen=True)
class HFTensor:
    """One tensor of a given model's HF checkpoint."""

    name: str
    tensor: TensorDef
    layer: int | None
    expert: int | None
    shape: tuple[int, ...]

    @property
    def key(self) -> MODEL_TENSOR:
        return self.tensor.key

    @property
    def role(self) -> Role:
        return self.tensor.role

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def _layer_tensors(cfg: ModelConfig, i: int, experts: bool) -> Iterator[HFTensor]:
    defs = [d for d in HF_LAYER if d.when(cfg, i)]
    routed = [d for d in defs if d.per_expert]
    done_routed = False
    for d in defs:
        if not d.per_expert:
            yield HFTensor(d.hf.format(bid=i), d, i, None, d.shape(cfg))
        elif experts and not done_routed:  # expert by expert, as the checkpoints list them
            done_routed = True
            for e in range(cfg.n_routed_experts):
                for r in routed:
                    yield HFTensor(r.hf.format(bid=i, xid=e), r, i, e, r.shape(cfg))


def hf_tensors(cfg: ModelConfig, experts: bool = True) -> list[HFTensor]:
    """Every tensor the forward pass reads from an HF checkpoint of `cfg`, in checkpoint order (no FP8 scales, no
    MTP layers, no rotary inv_freq). experts=False leaves out the routed experts."""
    out = [HFTensor(d.hf, d, None, None, d.shape(cfg)) for d in HF_TOP if d.when(cfg, -1)]
    for i in range(cfg.num_hidden_layers):
        out.extend(_layer_tensors(cfg, i, experts))
    return out


def expected_tensor_names(cfg: ModelConfig) -> list[str]:
    """Every weight the forward pass reads, by HF name (no scales, no MTP layers, no rotary inv_freq)."""
    return [t.name for t in hf_tensors(cfg)]


def resident_tensors(cfg: ModelConfig) -> list[HFTensor]:
    """The non-expert tensors (everything but the routed experts) with their shapes and roles: what the model
    keeps on its compute device, for byte counts (numel per role times the bytes per weight of the type)."""
    return hf_tensors(cfg, experts=False)


@dataclass(frozen=True)
class GGUFTensorPlan:
    """One tensor of a given model's GGUF file: name, torch-order shape, how it is built and from which HF tensors."""

    name: str
    tensor: GGUFDef
    layer: int | None
    shape: tuple[int, ...]
    hf: tuple[str, ...]

    @property
    def key(self) -> MODEL_TENSOR:
        return self.tensor.key

    @property
    def build(self) -> Build:
        return self.tensor.build

    @property
    def role(self) -> Role:
        return self.tensor.role

    @property
    def kind(self) -> str:
        return self.tensor.kind


def _gguf_entry(cfg: ModelConfig, g: GGUFDef, i: int | None) -> GGUFTensorPlan:
    name = gguf_name(g.key, i, g.src.suffix)
    return GGUFTensorPlan(name, g, i, g.shape(cfg), hf_for_gguf(name, cfg))


def gguf_tensors(cfg: ModelConfig) -> list[GGUFTensorPlan]:
    """Every GGUF tensor of `cfg` in llama.cpp's names, order and shapes (torch order)."""
    out = [_gguf_entry(cfg, g, None) for g in GGUF_TOP_FIRST if g.src.when(cfg, -1)]
    for i in range(cfg.num_hidden_layers):
        out += [_gguf_entry(cfg, g, i) for g in GGUF_LAYER if g.src.when(cfg, i)]
    out += [_gguf_entry(cfg, g, None) for g in GGUF_TOP_LAST if g.src.when(cfg, -1)]
    return out
