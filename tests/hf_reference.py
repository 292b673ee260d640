"""Build transformers' DeepseekV3ForCausalLM from a k2local WeightSource (weights dequantized by our loader)."""
from __future__ import annotations

import torch

from k2local.weights.hf_checkpoint import WeightSource, expert_name


def hf_model(src: WeightSource):
    """The transformers reference model in fp32 with the source's weights (eager attention)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = src.config
    rp: dict = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rp = dict(cfg.rope_scaling)
        rp["rope_type"] = rp.pop("type", rp.get("rope_type"))
        rp["rope_theta"] = cfg.rope_theta
    hc = DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        moe_intermediate_size=cfg.moe_intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        n_shared_experts=cfg.n_shared_experts, n_routed_experts=cfg.n_routed_experts,
        routed_scaling_factor=cfg.routed_scaling_factor, kv_lora_rank=cfg.kv_lora_rank, q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=cfg.n_group, topk_group=cfg.topk_group, num_experts_per_tok=cfg.num_experts_per_tok,
        first_k_dense_replace=cfg.first_k_dense_replace, norm_topk_prob=cfg.norm_topk_prob,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rp,
        rope_interleave=True, tie_word_embeddings=cfg.tie_word_embeddings, num_mtp_layers=0,
    )
    hc._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(hc).eval()
    sd: dict[str, torch.Tensor] = {}
    for n in src.names():  # type: ignore[attr-defined]
        if "rotary_emb" not in n and ".experts." not in n:
            sd[n] = src.get(n)
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe_layer(i):
            e_range = range(cfg.n_routed_experts)
            sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([src.get(expert_name(i, e, "gate")), src.get(expert_name(i, e, "up"))]) for e in e_range])
            sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack(
                [src.get(expert_name(i, e, "down")) for e in e_range])
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise AssertionError(f"transformers state dict mismatch: missing={missing} unexpected={unexpected}")
    return model
