"""Tiny random checkpoints with exactly Kimi K2's file layout (and siblings' variants) for tests and demos.

Kimi K2 and Moonlight variants ship a tiktoken ``tiktoken.model``; the DeepSeek-V3 variant ships DeepSeek-V3's
Hugging Face ``tokenizer.json`` layout (and a padded vocab_size, as DeepSeek-V3 has).

Weights are random: the model talks nonsense. Shapes are deliberately not multiples of 128 in places
(FP8 edge blocks), the router bias is non-zero, and the checkpoint is sharded with an index like the real one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from k2local import arch
from k2local.config import ModelConfig
from k2local.weights.sanitize import stored_as_checkpoint

TINY_VERSION = 1

# Kimi K2 layout: FP8 block weights, sigmoid router with bias, no groups, YaRN (beta 1/1), 1 dense layer.
_KIMI_K2: dict[str, Any] = dict(
    model_type="kimi_k2", hidden_size=512, intermediate_size=704, moe_intermediate_size=256,
    num_hidden_layers=4, num_attention_heads=4, q_lora_rank=192, kv_lora_rank=160, qk_nope_head_dim=48,
    qk_rope_head_dim=32, v_head_dim=48, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
    n_group=1, topk_group=1, routed_scaling_factor=2.827, first_k_dense_replace=1, rope_theta=50000.0,
    rope_scaling={"beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "original_max_position_embeddings": 4096, "type": "yarn"},
    max_position_embeddings=131072, fp8=True,
)

# Kimi K2 Thinking layout: routed experts native INT4 (compressed-tensors pack-quantized, group 32), the rest BF16.
_KIMI_K2_THINKING: dict[str, Any] = dict(_KIMI_K2, fp8=False, int4=True)

VARIANTS: dict[str, dict[str, Any]] = {
    "kimi_k2": _KIMI_K2,
    "kimi_k2_thinking": _KIMI_K2_THINKING,
    # Kimi K2.5 layout: the K2 Thinking text model nested in a multimodal checkpoint (text_config, weights under
    # language_model.); the tiny one has no vision tower weights beyond a stub
    "kimi_k25": dict(_KIMI_K2_THINKING, nested=True),
    # DeepSeek-V3 flavour: group-limited routing (4 groups, keep 2), different YaRN, 2 dense layers.
    "deepseek_v3": dict(
        _KIMI_K2, model_type="deepseek_v3", n_group=4, topk_group=2, routed_scaling_factor=2.5,
        first_k_dense_replace=2, rope_theta=10000.0,
        rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                      "original_max_position_embeddings": 4096, "type": "yarn"},
        max_position_embeddings=163840,
    ),
    # Moonlight flavour: BF16 weights, no q LoRA (plain q_proj), 2 shared experts, no rope scaling.
    "moonlight": dict(
        _KIMI_K2, model_type="deepseek_v3", num_hidden_layers=3, q_lora_rank=None, n_shared_experts=2,
        routed_scaling_factor=2.446, rope_scaling=None, max_position_embeddings=8192, fp8=False,
    ),
}


# Tokenizer layout per variant: Kimi K2 and Moonlight ship tiktoken.model, DeepSeek-V3 a HF tokenizer.json.
TOKENIZER_LAYOUT = {"kimi_k2": "tiktoken", "deepseek_v3": "tokenizer.json", "moonlight": "tiktoken",
                    "kimi_k2_thinking": "tiktoken", "kimi_k25": "tiktoken"}
# Variants that ship their own chat template (k2local/chat/templates/, put into tokenizer_config.json)
CHAT_TEMPLATE = {"kimi_k2_thinking": "kimi_k2_thinking.jinja", "kimi_k25": "kimi_k2_thinking.jinja"}
INT4_QUANTIZATION_CONFIG: dict[str, Any] = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}
# Variants whose files changed since TINY_VERSION (the cached built-in checkpoint is rebuilt for them).
_VARIANT_VERSION = {"deepseek_v3": 2}


def tiny_version(variant: str) -> int:
    """Version of the tiny checkpoint layout for `variant` (recorded in config.json and the cache path)."""
    return _VARIANT_VERSION.get(variant, TINY_VERSION)


def _config_json(variant: str, vocab_size: int, bos_id: int, eos_id: int, overrides: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    v = dict(VARIANTS[variant], **(overrides or {}))
    fp8 = v.pop("fp8")
    int4 = v.pop("int4", False)
    v.pop("nested", None)
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "aux_loss_alpha": 0.001, "bos_token_id": bos_id, "eos_token_id": eos_id, "hidden_act": "silu",
        "initializer_range": 0.02, "moe_layer_freq": 1, "norm_topk_prob": True, "num_key_value_heads":
        v["num_attention_heads"], "num_nextn_predict_layers": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-6,
        "scoring_func": "sigmoid", "seq_aux": True, "tie_word_embeddings": False, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "transformers_version": "4.48.3", "use_cache": True, "vocab_size": vocab_size,
        "k2local_tiny": tiny_version(variant),
    }
    cfg.update(v)
    if fp8:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}
    if int4:
        cfg["quantization_config"] = json.loads(json.dumps(INT4_QUANTIZATION_CONFIG))
    if VARIANTS[variant].get("nested"):  # Kimi K2.5: the text config inside the multimodal one
        text = dict(sorted(cfg.items()))
        text.pop("k2local_tiny")
        qc = text.pop("quantization_config", None)
        outer: dict[str, Any] = {
            "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
            "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config",
                         "AutoModel": "modeling_kimi_k25.KimiK25ForConditionalGeneration"},
            "bos_token_id": bos_id, "eos_token_id": eos_id, "k2local_tiny": tiny_version(variant),
            "media_placeholder_token_id": vocab_size - 1, "text_config": text, "torch_dtype": "bfloat16",
            "vision_config": {"model_type": "moonvit", "hidden_size": 64, "num_hidden_layers": 1, "patch_size": 14},
        }
        if qc is not None:
            outer["quantization_config"] = qc
        return dict(sorted(outer.items()))
    return dict(sorted(cfg.items()))


def _random_weights(cfg: ModelConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Float32 weights with healthy activation scales (peaked logits, so greedy tokens are stable)."""
    out: dict[str, torch.Tensor] = {}
    for t in arch.hf_tensors(cfg):
        if t.role is arch.Role.NORM:
            out[t.name] = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        elif t.key == arch.MODEL_TENSOR.FFN_EXP_PROBS_B:
            out[t.name] = 0.1 * torch.randn(t.shape, generator=gen)
        else:
            rows, cols = t.shape
            std = 2.0 if t.role is arch.Role.HEAD else 1.0
            out[t.name] = torch.randn(rows, cols, generator=gen) * std / (
                cols ** 0.5 if t.role is not arch.Role.EMBEDDING else 1)
    return out


def _write_tokenizer(out: Path, variant: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The variant's tokenizer files plus config.json and generation_config.json; returns the config dict."""
    from k2local.tiny.tokenizer import write_tiny_deepseek_tokenizer, write_tiny_tokenizer  # noqa: PLC0415

    if TOKENIZER_LAYOUT[variant] == "tokenizer.json":
        tv = write_tiny_deepseek_tokenizer(out)
        vocab = -(-tv.size // 64) * 64  # padded embedding rows past the tokenizer, as DeepSeek-V3's 129280
        cfg_d = _config_json(variant, vocab, tv.bos_id, tv.eos_id, overrides)
        gen = {"_from_model_config": True, "bos_token_id": tv.bos_id, "eos_token_id": tv.eos_id, "do_sample": True,
               "temperature": 0.6, "top_p": 0.95, "transformers_version": "4.46.3"}
    else:
        n_base = write_tiny_tokenizer(out)
        cfg_d = _config_json(variant, n_base + 256, n_base, n_base + 1, overrides)
        gen = {"bos_token_id": n_base, "eos_token_id": n_base + 2, "temperature": 0.6}
    (out / "config.json").write_text(json.dumps(cfg_d, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if variant in CHAT_TEMPLATE:  # the checkpoint's own template, in tokenizer_config.json as real checkpoints do
        tpl = (Path(__file__).resolve().parents[1] / "chat" / "templates" / CHAT_TEMPLATE[variant]).read_text()
        tc_path = out / "tokenizer_config.json"
        tc = json.loads(tc_path.read_text()) if tc_path.exists() else {}
        tc["chat_template"] = tpl
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
        (out / "chat_template.jinja").unlink(missing_ok=True)  # it would win over tokenizer_config.json's
    return cfg_d


ROUTE_SKEW_SEED = 2026
ROUTE_SKEW_SCALE = 0.25  # bias gap per unit of log-rank: routers' sigmoid scores spread ~0.2 on random weights


def zipf_router_bias(n_experts: int, s: float, layer: int, seed: int = ROUTE_SKEW_SEED) -> torch.Tensor:
    """A selection bias (e_score_correction_bias) that makes a layer's routing Zipf-shaped: the expert of rank r
    (a fixed random permutation per layer) gets -ROUTE_SKEW_SCALE * s * ln(r), so low ranks win most top-k picks.
    s = 0 gives no bias (near-uniform routing)."""
    g = torch.Generator().manual_seed(seed * 1009 + layer)
    rank = torch.empty(n_experts, dtype=torch.float32)
    rank[torch.randperm(n_experts, generator=g)] = torch.arange(1, n_experts + 1, dtype=torch.float32)
    return -ROUTE_SKEW_SCALE * s * rank.log()


def skew_gguf_routers(src: str | Path, dst: str | Path, s: float, seed: int = ROUTE_SKEW_SEED) -> Path:
    """A copy of GGUF `src` at `dst` whose MoE layers' selection bias (exp_probs_b) is zipf_router_bias(s): the same
    model with skewed routing, without rebuilding it. Written atomically."""
    from gguf import GGUFReader  # noqa: PLC0415

    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    try:
        reader = GGUFReader(tmp, "r+")
        n = 0
        for t in reader.tensors:
            if t.name.endswith("exp_probs_b.bias"):
                layer = int(t.name.split(".")[1])
                t.data[...] = zipf_router_bias(int(t.data.size), s, layer, seed).numpy().reshape(t.data.shape)
                n += 1
        reader.data.flush()
        del reader
        if n == 0:
            raise ValueError(f"{src}: no exp_probs_b tensors (not a MoE GGUF with a router bias)")
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst


def balance_gguf_routers(path: str | Path, ids: list[int], passes: int = 2) -> list[float]:
    """Set GGUF `path`'s router selection biases (exp_probs_b, in place) so that over the calibration tokens `ids`
    every expert of a layer is about equally likely to be chosen, as DeepSeek-V3's auxiliary-loss-free balancing
    leaves a trained model: bias_e = -(mean sigmoid score of expert e). Random weights otherwise give each
    layer a few favourite experts for every token. Returns each MoE layer's share of uses taken by its 8 most
    used experts, measured after the last of `passes` corrections."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from gguf import GGUFReader  # noqa: PLC0415

    from k2local.engine import LoadOptions  # noqa: PLC0415
    from k2local.model import KimiK2Model  # noqa: PLC0415
    from k2local.placement import build_backend  # noqa: PLC0415
    from k2local.weights.gguf_checkpoint import GGUFSource  # noqa: PLC0415

    shares: list[float] = []
    for i in range(passes + 1):
        source = GGUFSource(path)
        cpu = torch.device("cpu")
        backend = build_backend(source, LoadOptions(cpu_only=True, experts_on="ram",
                                                    extra={"save_routing_stats": False}), cpu, torch.float32)
        model = KimiK2Model(source, experts=backend, device=cpu, dtype=torch.float32)
        scores: list[torch.Tensor] = []
        picks: list[torch.Tensor] = []
        router = model.router

        def record(x, weight, bias, router=router):
            scores.append(torch.sigmoid(x.float() @ weight.float().t()).mean(0))
            idx, w = router(x, weight, bias)
            picks.append(idx)
            return idx, w

        model.router = record  # type: ignore[assignment]
        model.forward(ids, model.new_cache())
        shares = [float(np.sort(np.bincount(p.flatten().numpy(), minlength=len(sc)))[::-1][:8].sum() / p.numel())
                  for p, sc in zip(picks, scores)]
        backend.close()
        del model, backend, source
        if i == passes:
            break
        reader = GGUFReader(path, "r+")
        biases = sorted((t for t in reader.tensors if t.name.endswith("exp_probs_b.bias")),
                        key=lambda t: int(t.name.split(".")[1]))
        for t, sc in zip(biases, scores):
            t.data[...] = (-sc).numpy().reshape(t.data.shape)
        reader.data.flush()
        del reader
    return shares


def write_config(out: str | Path, variant: str = "kimi_k2", overrides: dict[str, Any] | None = None) -> ModelConfig:
    """A tiny checkpoint's tokenizer, config.json and generation_config.json in `out`, without weights (for
    k2local.convert.random_gguf); returns its config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return ModelConfig.from_dict(_write_tokenizer(out, variant, overrides))


def make_tiny(out: str | Path, variant: str = "kimi_k2", seed: int = 0, shards: int = 3,
              overrides: dict[str, Any] | None = None, route_skew: float | None = None) -> Path:
    """Write a tiny random checkpoint to `out` (a new directory) with the variant's exact file layout (Kimi K2 and
    Moonlight: tiktoken.model; DeepSeek-V3: tokenizer.json).
    overrides: config fields to change from the variant (e.g. bigger experts for a benchmark).
    route_skew: a Zipf exponent for the routers' selection bias (zipf_router_bias), fixed seed; None: random."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose from {', '.join(VARIANTS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_d = _write_tokenizer(out, variant, overrides)
    cfg = ModelConfig.from_dict(cfg_d)
    gen = torch.Generator().manual_seed(seed)
    weights = _random_weights(cfg, gen)
    if route_skew is not None:
        for layer in range(cfg.num_hidden_layers):
            if cfg.is_moe_layer(layer):
                name = arch.router_names(layer)[1]
                weights[name] = zipf_router_bias(cfg.n_routed_experts, route_skew, layer)
    stored: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        stored.update(stored_as_checkpoint(name, w, cfg.is_fp8, int4=cfg.is_int4))
    for i in range(cfg.num_hidden_layers):  # present in real K2 checkpoints; runners ignore it
        stored[arch.ROTARY_INV_FREQ.format(bid=i)] = cfg.rope_inv_freq()[0].to(torch.bfloat16)
    if VARIANTS[variant].get("nested"):  # K2.5: text weights under language_model., a vision tower beside them
        stored = {"language_model." + n: t for n, t in stored.items()}
        g2 = torch.Generator().manual_seed(seed + 1)
        stored["vision_tower.patch_embed.proj.weight"] = torch.randn(64, 3 * 14 * 14, generator=g2).to(torch.bfloat16)
        stored["mm_projector.proj.0.weight"] = torch.randn(cfg.hidden_size, 64, generator=g2).to(torch.bfloat16)
    _write_shards(out, stored, shards)
    return out


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    """Split by layer order into `shards` files named like K2's (model-1-of-N.safetensors) plus the index."""
    names = list(tensors)
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    total = 0
    for k in range(shards):
        part = names[k * per:(k + 1) * per]
        fname = f"model-{k + 1}-of-{shards}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(out / fname), metadata={"format": "pt"})
        for n in part:
            weight_map[n] = fname
            total += tensors[n].numel() * tensors[n].element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def default_tiny_path(variant: str = "kimi_k2") -> Path:
    """The built-in tiny checkpoint, generated once into the user cache (atomically) and reused."""
    root = Path(os.environ.get("K2LOCAL_CACHE", Path.home() / ".cache" / "k2local"))
    dest = root / f"tiny-{variant}-v{tiny_version(variant)}"
    if (dest / "model.safetensors.index.json").exists():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{variant}-", dir=root))
    try:
        make_tiny(tmp, variant)
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
