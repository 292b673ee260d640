"""Quantization recipes: which ggml type each GGUF tensor of a DeepSeek-V3-family model gets.

A recipe picks a target type from a tensor's role (attention, shared expert, routed experts, ...), its layer and
its size; `resolve_type` then applies the rules every recipe shares, as llama.cpp does: 1-D tensors, norms, biases and
the router stay F32; a target whose block does not divide the row length falls back (Q2_K/Q3_K -> Q4_0,
Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), and to F16 when even that does not fit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from k2local.errors import K2Error
from quant.gguf_file import block_size, qtype_of
from quant.types import FLOAT_TYPES as _FLOAT_QTYPES
from quant.types import file_type

EXPERT_KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
KEEP_F32_KINDS = ("norm", "exp_probs_b", "ffn_gate_inp")
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
FLOAT_TYPES = tuple(t.name for t in _FLOAT_QTYPES)  # ("F32", "F16", "BF16")


@dataclass(frozen=True)
class TensorRole:
    """What a GGUF tensor is, for type selection.

    kind: token_embd, output, attn_q, attn_q_a, attn_q_b, attn_kv_a_mqa, attn_k_b, attn_v_b, attn_kv_b, attn_output,
    ffn_gate/ffn_up/ffn_down (dense), ffn_*_shexp, ffn_*_exps, ffn_gate_inp, exp_probs_b, norm.
    """

    name: str
    kind: str
    layer: int | None
    n_layers: int
    first_moe_layer: int
    cols: int

    @property
    def is_expert(self) -> bool:
        return self.kind in EXPERT_KINDS

    @property
    def moe_index(self) -> int:
        """Position among the MoE layers (0 = first MoE layer)."""
        return (self.layer or 0) - self.first_moe_layer

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_moe_layer

    def edge_moe_layer(self, first: int, last: int) -> bool:
        """Whether this is one of the first `first` or last `last` MoE layers (only in models with > 4x that many,
        so shallow test models keep the recipe's main types)."""
        if self.n_moe_layers <= 4 * (first + last):
            return False
        return self.moe_index < first or self.moe_index >= self.n_moe_layers - last


Chooser = Callable[[TensorRole], str]


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    choose: Chooser
    file_type: int  # llama_ftype written as general.file_type (informational)


def _experts(gate_up: str, down: str, rest: str = "Q8_0", head: str = "Q8_0", edge: tuple[str, str] | None = None,
             edge_layers: tuple[int, int] = (0, 0)) -> Chooser:
    """Routed experts at gate_up/down (edge MoE layers at `edge`), everything else `rest`, output head `head`."""

    def choose(r: TensorRole) -> str:
        if r.is_expert:
            gu, dn = edge if edge and r.edge_moe_layer(*edge_layers) else (gate_up, down)
            return dn if r.kind == "ffn_down_exps" else gu
        if r.kind == "output":
            return head
        return rest

    return choose


def _uniform(t: str) -> Chooser:
    return lambda r: t


# general.file_type of the recipes (gguf.LlamaFileType, through quant.types)
_FT = {n: file_type(n) for n in ("F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_S",
                                 "Q2_K", "Q2_K_S", "Q4_0", "Q4_1", "Q5_0", "Q5_1")}

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("q8", "everything Q8_0", _uniform("Q8_0"), _FT["Q8_0"]),
    Recipe("q6", "experts Q6_K; rest Q8_0", _experts("Q6_K", "Q6_K"), _FT["Q6_K"]),
    Recipe("q5", "experts Q5_K (down Q6_K); rest Q8_0", _experts("Q5_K", "Q6_K"), _FT["Q5_K_M"]),
    Recipe("q4", "experts Q4_K; rest Q8_0, output Q6_K", _experts("Q4_K", "Q4_K", head="Q6_K"), _FT["Q4_K_M"]),
    Recipe("q3", "experts Q3_K (down Q4_K), first/last MoE layer Q4_K/Q5_K; rest Q8_0, output Q6_K",
           _experts("Q3_K", "Q4_K", head="Q6_K", edge=("Q4_K", "Q5_K"), edge_layers=(1, 1)), _FT["Q3_K_M"]),
    Recipe("q2", "experts Q2_K (down Q3_K), first 2 / last MoE layers Q4_K; attention, shared expert, dense "
                 "layers Q8_0; output Q6_K (Unsloth-style dynamic 2-bit)",
           _experts("Q2_K", "Q3_K", head="Q6_K", edge=("Q4_K", "Q4_K"), edge_layers=(2, 1)), _FT["Q2_K"]),
    # INT4 checkpoints (Kimi K2 Thinking, K2.5): the experts' 4-bit codes copied into Q4_0, not re-rounded
    Recipe("int4", "experts Q4_0 (from an INT4 checkpoint: its 4-bit codes copied, lossless where the scales are "
                   "fp16 values); rest Q8_0", _experts("Q4_0", "Q4_0"), _FT["Q4_0"]),
    Recipe("int4-bf16", "experts Q4_0 as int4; rest BF16 (the INT4 checkpoint's other weights kept exactly)",
           _experts("Q4_0", "Q4_0", rest="BF16", head="BF16"), _FT["Q4_0"]),
    Recipe("bf16", "unquantized BF16 (norms F32)", _uniform("BF16"), _FT["BF16"]),
    Recipe("f16", "unquantized F16 (norms F32)", _uniform("F16"), _FT["F16"]),
    Recipe("f32", "unquantized F32 (reference)", _uniform("F32"), _FT["F32"]),
]}


def get_recipe(name: str) -> Recipe:
    """A named recipe, or `pure:TYPE` (every quantizable tensor TYPE, like llama-quantize --pure)."""
    key = name.strip().lower()
    if key in RECIPES:
        return RECIPES[key]
    if key.startswith("pure:"):
        t = key[5:].upper()
        try:
            qtype_of(t)
        except ValueError:
            raise K2Error(f"recipe {name!r}: unknown ggml type {t!r}") from None
        return Recipe(f"pure:{t}", f"every weight {t} (llama-quantize --pure)", _uniform(t),
                      _FT.get(t, _FT.get(t + "_M", _FT.get(t + "_S", 0))))
    raise K2Error(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)} or pure:TYPE")


def fallback_type(target: str, cols: int) -> str:
    """llama.cpp's fallback for a row length the target's block does not divide (then F16)."""
    t = target.upper()
    if cols % block_size(qtype_of(t)) == 0:
        return t
    t = FALLBACK.get(t, t)
    return t if cols % block_size(qtype_of(t)) == 0 else "F16"


def resolve_type(recipe: Recipe, role: TensorRole, can_encode: Callable[[str, int], bool] | None = None) -> str:
    """The ggml type name `role` gets under `recipe` (shared rules and fallbacks applied)."""
    if role.kind in KEEP_F32_KINDS:
        return "F32"
    t = fallback_type(recipe.choose(role), role.cols)
    if can_encode is not None and not can_encode(t, role.cols):
        t = "F16"
    return t
