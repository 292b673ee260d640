"""The Kimi K2 / DeepSeek-V3 forward pass: MLA attention with a compressed KV cache, sigmoid MoE router, SwiGLU.

Routed experts are computed by an `ExpertBackend` (see offload/): the model never holds them itself, so the same
code runs with experts in GPU memory, in RAM, or streamed from disk.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F

from k2local import arch
from k2local.weights.hf_checkpoint import WeightSource
from k2local.config import ModelConfig
from k2local.linear import MIN_QUANT_PARAMS, QuantWeight, decode_attention, linear, quantized_heads, quantized_weight
from k2local.weights import sanitize
from offload.threads import PARALLEL_ATTENTION_MACS, decode_step, full_threads, torch_threads


class ExpertBackend(Protocol):
    """Computes the routed experts of one MoE layer: y[t] = sum_k w[t, k] * Expert_{idx[t, k]}(x[t])."""

    def forward(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:  # one fused op (same values; 1.7x faster on CPU)
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


Weight = torch.Tensor | QuantWeight


def swiglu(x: torch.Tensor, gate: Weight, up: Weight, down: Weight) -> torch.Tensor:
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) by angle pos*inv_freq[i]; x [..., T, heads?, d], cos [T, d/2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x2 * cos + x1 * sin
    return out


class KVCache:
    """Compressed MLA cache: per layer the normalized latent c (kv_lora_rank) and the roped k_pe per position."""

    def __init__(self, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, capacity: int = 256):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.capacity = capacity
        self.latent = [torch.zeros(capacity, cfg.kv_lora_rank, device=device, dtype=dtype)
                       for _ in range(cfg.num_hidden_layers)]
        self.k_pe = [torch.zeros(capacity, cfg.qk_rope_head_dim, device=device, dtype=dtype)
                     for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        if cap == self.capacity:
            return
        for i in range(len(self.latent)):
            for store in (self.latent, self.k_pe):
                new = torch.zeros(cap, store[i].shape[1], device=self.device, dtype=self.dtype)
                new[: self.capacity] = store[i]
                store[i] = new
        self.capacity = cap

    def write(self, layer: int, pos: int, latent: torch.Tensor, k_pe: torch.Tensor) -> None:
        self._grow(pos + latent.shape[0])
        self.latent[layer][pos: pos + latent.shape[0]] = latent
        self.k_pe[layer][pos: pos + k_pe.shape[0]] = k_pe

    def copy_prefix_from(self, other: "KVCache", n: int) -> None:
        """Hold the first n positions of another cache of the same model (and nothing after them)."""
        self._grow(n)
        with torch.inference_mode():  # cache tensors are inference tensors
            for i in range(len(self.latent)):
                self.latent[i][:n] = other.latent[i][:n]
                self.k_pe[i][:n] = other.k_pe[i][:n]
        self.length = n

    def truncate(self, length: int) -> None:
        """Forget positions >= length (prefix reuse keeps the shared prefix)."""
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.latent + self.k_pe)


@dataclass
class SeqRows:
    """One sequence's rows in a forward step: tokens `ids` at positions pos.. against its own cache (a decode
    token, or a prefill chunk). last_only: logits for the last row only (the others' FFN at the last layer is
    skipped, as llama.cpp does)."""

    ids: Sequence[int]
    cache: KVCache
    pos: int
    last_only: bool = False


@dataclass
class LayerWeights:
    """Non-expert weights of one decoder layer, already on the compute device."""

    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    q_proj: Weight | None
    q_a: Weight | None
    q_a_norm: torch.Tensor | None
    q_b: Weight | None
    kv_a: Weight
    kv_a_norm: torch.Tensor
    w_uk: torch.Tensor  # [heads, nope, kv_lora]
    w_uv: torch.Tensor  # [heads, v, kv_lora]
    o_proj: Weight
    dense: tuple[Weight, Weight, Weight] | None
    router: torch.Tensor | None
    router_bias: torch.Tensor | None
    shared: tuple[Weight, Weight, Weight] | None
    # w_uk / w_uv kept in their GGUF block type for decoding on the CPU (offload.kernels.QHeads: k_b
    # [heads, kv_lora, nope], v_b [heads, v, kv_lora]); prefill from empty keeps using the dense form
    uk_q: Any = None
    uv_q: Any = None
    # both in one kernel call for a decoded token: offload.kernels.MLADecode (None where the kernels cannot)
    mla: Any = None


class Router:
    """DeepSeek-V3 `noaux_tc` gate: sigmoid scores, bias for selection only, group-limited top-k, renorm, scale."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        logits = F.linear(x.float(), weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(-1)
        choice = scores + bias.float() if bias is not None else scores
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            t = choice.shape[0]
            grouped = choice.view(t, cfg.n_group, -1)
            group_scores = grouped.topk(2, dim=-1)[0].sum(-1) if bias is not None else grouped.amax(-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(cfg.topk_group, -1, sorted=False)[1], 1)
            mask = keep.unsqueeze(-1).expand_as(grouped).reshape(t, -1)
            choice = choice.masked_fill(~mask.bool(), float("-inf"))
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if cfg.norm_topk_prob and cfg.num_experts_per_tok > 1:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor


# new tokens after a cached prefix from which attention expands keys/values per head (see KimiK2Model._attention)
MHA_MIN_TOKENS = 128
# bytes of fp32 attention scores above which the absorbed form walks the keys in blocks (online softmax)
SCORE_BLOCK_BYTES = 64 << 20
# bytes of expanded keys + values per head group in the MHA form (heads are taken in groups under this)
EXPAND_BYTES = 512 << 20


def _causal_mask(t: int, s: int, pos: int, k0: int, device: torch.device) -> torch.Tensor:
    """[t, s - k0] True where query pos + i may not see key k0 + j."""
    return torch.arange(k0, s, device=device)[None, :] > (pos + torch.arange(t, device=device))[:, None]


def _absorbed_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, kpe: torch.Tensor, pos: int,
                        scale: float) -> torch.Tensor:
    """MLA in the latent space: softmax((q_lat lat^T + q_pe kpe^T) scale) lat; q_lat [h, t, c], q_pe [h, t, r],
    lat [s, c], kpe [s, r]; query i is at position pos + i. Returns [h, t, c]. Past SCORE_BLOCK_BYTES of scores the
    keys are taken in blocks with an online softmax, so memory stays bounded at any context length."""
    h, t, _ = q_lat.shape
    s = lat.shape[0]
    if s <= _key_block(h, t):
        scores = (torch.matmul(q_lat, lat.t()) + torch.matmul(q_pe, kpe.t())) * scale
        if t > 1:
            scores = scores.masked_fill(_causal_mask(t, s, pos, 0, lat.device)[None], float("-inf"))
        return torch.matmul(scores.float().softmax(-1).to(lat.dtype), lat)
    m, den, acc = _absorbed_partial(q_lat, q_pe, lat, kpe, pos, scale, 0, s)
    return (acc / den).to(lat.dtype)


def _key_block(h: int, t: int) -> int:
    return max(256, SCORE_BLOCK_BYTES // (4 * h * t))


def _absorbed_partial(q_lat: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, kpe: torch.Tensor, pos: int,
                      scale: float, k0: int, k1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The absorbed form over keys [k0, k1) only, unnormalised: (running max, softmax denominator, weighted sum of
    latents), fp32 [h, t, 1], [h, t, 1], [h, t, c]. Key k0 must be visible to every query (it is when k0 = 0)."""
    h, t, _ = q_lat.shape
    block = _key_block(h, t)
    m = torch.full((h, t, 1), float("-inf"), device=lat.device)
    den = torch.zeros(h, t, 1, device=lat.device)
    acc = torch.zeros(h, t, lat.shape[1], device=lat.device)
    for b0 in range(k0, k1, block):
        b1 = min(k1, b0 + block)
        sc = ((torch.matmul(q_lat, lat[b0:b1].t()) + torch.matmul(q_pe, kpe[b0:b1].t())) * scale).float()
        if t > 1 and b1 > pos + 1:
            sc.masked_fill_(_causal_mask(t, b1, pos, b0, lat.device)[None], float("-inf"))
        m, den, acc = _softmax_fold(m, den, acc, sc, lat[b0:b1].float())
    return m, den, acc


def _softmax_fold(m: torch.Tensor, den: torch.Tensor, acc: torch.Tensor, sc: torch.Tensor, values: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One key block of an online softmax: fp32 scores sc [..., n, kb] (overwritten) against values [..., kb, c]
    folded into the running (max, denominator, weighted sum of values) [..., n, 1], [..., n, 1], [..., n, c]."""
    m_new = torch.maximum(m, sc.amax(-1, keepdim=True))
    p = sc.sub_(m_new).exp_()
    corr = (m - m_new).exp_()
    return m_new, den * corr + p.sum(-1, keepdim=True), acc * corr + torch.matmul(p.to(values.dtype), values).float()


_split_pool: ThreadPoolExecutor | None = None


def _split_decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, kpe: torch.Tensor,
                            scale: float, parts: int) -> torch.Tensor:
    """One query per head (a decode step) against a long cache, the keys split into `parts` ranges computed on
    `parts` threads at one torch thread each, their partial softmaxes then merged (flash-decoding's split-K).
    torch's own pool parallelises this product poorly: 64 heads x 4096 keys took 5.3 ms at 2 threads against
    4.8 ms at one (2-core Xeon)."""
    global _split_pool
    if _split_pool is None or _split_pool._max_workers < parts - 1:  # noqa: SLF001
        _split_pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="k2-attn")
    s = lat.shape[0]
    bounds = [s * i // parts for i in range(parts + 1)]

    def part(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        with torch.inference_mode():
            return _absorbed_partial(q_lat, q_pe, lat, kpe, s - 1, scale, bounds[i], bounds[i + 1])

    futures = [_split_pool.submit(part, i) for i in range(1, parts)]
    pieces = [_absorbed_partial(q_lat, q_pe, lat, kpe, s - 1, scale, bounds[0], bounds[1])]
    pieces += [f.result() for f in futures]
    m = torch.stack([p[0] for p in pieces]).amax(0)
    den = sum(p[1] * (p[0] - m).exp() for p in pieces)
    acc = sum(p[2] * (p[0] - m).exp() for p in pieces)
    return (acc / den).to(lat.dtype)


# queries per block of the MHA form's attention (a block's scores against all its keys in one product)
QUERY_BLOCK = 256


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, scale: float,
                      out: torch.Tensor) -> None:
    """out = softmax(q k^T scale, causal) v per head, in blocks of QUERY_BLOCK queries, each against only the keys
    it may see; q [h, t, d], k [h, s, d], v [h, s, dv], query i at position pos + i, out [h, t, dv]. A block's
    scores above SCORE_BLOCK_BYTES go over the keys in blocks with an online softmax.

    On the CPU torch's scaled_dot_product_attention takes a slow path for MLA's unequal key / value head sizes
    (192 / 128): 445 ms for 64 heads at 512 tokens against 75 ms here (2-core Xeon, fp32)."""
    h, t, _ = q.shape
    for a in range(0, t, QUERY_BLOCK):
        b = min(t, a + QUERY_BLOCK)
        n, kend = b - a, pos + b  # keys [0, kend) are visible to some query of the block
        kb = max(QUERY_BLOCK, SCORE_BLOCK_BYTES // (4 * h * n))
        mask_from = pos + a + 1  # keys from here on are masked for the block's first query
        if kend <= kb:
            sc = torch.bmm(q[:, a:b], k[:, :kend].transpose(1, 2)).mul_(scale)
            if kend > mask_from:
                sc.masked_fill_(_causal_mask(n, kend, pos + a, 0, q.device)[None], float("-inf"))
            torch.bmm(sc.softmax(-1), v[:, :kend], out=out[:, a:b])
            continue
        m = torch.full((h, n, 1), float("-inf"), device=q.device, dtype=torch.float32)
        den = torch.zeros(h, n, 1, device=q.device, dtype=torch.float32)
        acc = torch.zeros(h, n, v.shape[-1], device=q.device, dtype=torch.float32)
        for k0 in range(0, kend, kb):
            k1 = min(kend, k0 + kb)
            sc = torch.bmm(q[:, a:b], k[:, k0:k1].transpose(1, 2)).float().mul_(scale)
            if k1 > mask_from:
                sc.masked_fill_(_causal_mask(n, k1, pos + a, k0, q.device)[None], float("-inf"))
            m, den, acc = _softmax_fold(m, den, acc, sc, v[:, k0:k1])
        out[:, a:b] = (acc / den).to(out.dtype)


def _expanded_attention(lw: "LayerWeights", q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor,
                        kpe: torch.Tensor, pos: int, scale: float) -> torch.Tensor:
    """MLA as MHA: keys [lat w_uk_h, kpe] and values lat w_uv_h per head, causal from position pos;
    q_nope [t, h, nope], q_pe [t, h, r]. Heads go in groups so the expanded keys/values stay under EXPAND_BYTES.
    Returns [t, h, v]."""
    t, nh, _ = q_nope.shape
    s = lat.shape[0]
    qh = torch.cat([q_nope, q_pe], -1).transpose(0, 1)  # [h, t, nope + r]
    per_head = s * (qh.shape[-1] + lw.w_uv.shape[1]) * lat.element_size()
    group = max(1, min(nh, EXPAND_BYTES // max(1, per_head)))
    out = torch.empty(nh, t, lw.w_uv.shape[1], dtype=q_nope.dtype, device=q_nope.device)
    for h0 in range(0, nh, group):
        h1 = min(nh, h0 + group)
        k = torch.cat([torch.einsum("sc,hdc->hsd", lat, lw.w_uk[h0:h1]), kpe[None].expand(h1 - h0, -1, -1)], -1)
        v = torch.einsum("sc,hdc->hsd", lat, lw.w_uv[h0:h1])
        _causal_attention(qh[h0:h1], k, v, pos, scale, out[h0:h1])
    return out.transpose(0, 1)


class KimiK2Model:
    """Forward pass over a `WeightSource`; experts delegated to an `ExpertBackend`."""

    def __init__(self, source: WeightSource, experts: ExpertBackend | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 progress: Callable[[str, int], None] | None = None, quantized_linear: bool | None = None):
        """quantized_linear: keep GGUF block-quantized linear weights as bytes (CPU: multiplied by the kernels;
        GPU: dequantized per use). None (default): on CPU, for weights large enough to gain, on a GPU never;
        True: every supported weight; False: dequantize all at load."""
        self.cfg: ModelConfig = source.config
        self.device = torch.device(device)
        self.dtype = dtype
        cfg = self.cfg
        if experts is None:
            from k2local.placement import DenseExperts  # noqa: PLC0415

            experts = DenseExperts.from_source(source, dtype=dtype, device=self.device)
        self.experts = experts
        self.router = Router(cfg)

        min_params = MIN_QUANT_PARAMS if quantized_linear is None else 0
        quantized_linear = self.device.type == "cpu" if quantized_linear is None else quantized_linear

        def load(name: str, dt: torch.dtype | None = None) -> torch.Tensor:
            t = source.get(name, dt or dtype).to(self.device)
            if progress:
                progress(name, t.numel() * t.element_size())
            return t

        def load_linear(name: str) -> Weight:
            q = quantized_weight(source, name, min_params, self.device) if quantized_linear else None
            if q is None:
                return load(name)
            if progress:
                progress(name, q.nbytes)
            return q

        T = arch.MODEL_TENSOR
        self.embed = load(arch.hf_name(T.TOKEN_EMBD))
        self.norm = load(arch.hf_name(T.OUTPUT_NORM))
        self.lm_head: Weight = self.embed if cfg.tie_word_embeddings else load_linear(arch.hf_name(T.OUTPUT))
        inv_freq, self.rope_mscale = cfg.rope_inv_freq()
        self.inv_freq = inv_freq.to(self.device)
        self.layers: list[LayerWeights] = []
        nh, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
        projs = ("gate", "up", "down")
        for i in range(cfg.num_hidden_layers):
            n = functools.partial(arch.hf_name, bid=i)  # this layer's HF name of a tensor key
            w_uk, w_uv = sanitize.absorbed_kv_b(load(n(T.ATTN_KV_B)), nh, nope)
            moe = cfg.is_moe_layer(i)
            lw = LayerWeights(
                attn_norm=load(n(T.ATTN_NORM)), ffn_norm=load(n(T.FFN_NORM)),
                q_proj=load_linear(n(T.ATTN_Q)) if cfg.q_lora_rank is None else None,
                q_a=load_linear(n(T.ATTN_Q_A)) if cfg.q_lora_rank else None,
                q_a_norm=load(n(T.ATTN_Q_A_NORM)) if cfg.q_lora_rank else None,
                q_b=load_linear(n(T.ATTN_Q_B)) if cfg.q_lora_rank else None,
                kv_a=load_linear(n(T.ATTN_KV_A_MQA)), kv_a_norm=load(n(T.ATTN_KV_A_NORM)),
                w_uk=w_uk, w_uv=w_uv,
                o_proj=load_linear(n(T.ATTN_OUT)),
                dense=None if moe else tuple(load_linear(n(arch.DENSE_PROJS[w])) for w in projs),
                router=load(n(T.FFN_GATE_INP), torch.float32) if moe else None,
                router_bias=load(n(T.FFN_EXP_PROBS_B), torch.float32)
                if moe and source.has(n(T.FFN_EXP_PROBS_B)) else None,
                shared=tuple(load_linear(n(arch.SHARED_PROJS[w])) for w in projs)
                if moe and cfg.n_shared_experts else None,
            )
            if quantized_linear:
                lw.uk_q, lw.uv_q = quantized_heads(source, i, nh, self.device)
                lw.mla = decode_attention(lw.uk_q, lw.uv_q)
            self.layers.append(lw)

    def new_cache(self, capacity: int = 256) -> KVCache:
        return KVCache(self.cfg, self.device, self.dtype, capacity)

    # ------------------------------------------------------------------ forward
    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ang = positions.float()[:, None] * self.inv_freq[None, :]
        return (ang.cos() * self.rope_mscale).to(self.dtype), (ang.sin() * self.rope_mscale).to(self.dtype)

    def _attention(self, i: int, lw: LayerWeights, x: torch.Tensor, seqs: Sequence[SeqRows],
                   cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Projections once over all rows of the step; the attention itself per sequence, against its cache."""
        cfg = self.cfg
        t = x.shape[0]
        nh, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if lw.q_proj is not None:
            q = linear(x, lw.q_proj)
        else:
            assert lw.q_a is not None and lw.q_b is not None and lw.q_a_norm is not None
            q = linear(rms_norm(linear(x, lw.q_a), lw.q_a_norm, cfg.rms_norm_eps), lw.q_b)
        q = q.view(t, nh, nope + rope)
        q_nope, q_pe = q[..., :nope], apply_rope(q[..., nope:], cos[:, None], sin[:, None])
        ckv = linear(x, lw.kv_a)
        latent = rms_norm(ckv[:, : cfg.kv_lora_rank], lw.kv_a_norm, cfg.rms_norm_eps)
        k_pe = apply_rope(ckv[:, cfg.kv_lora_rank:], cos, sin)
        outs, a = [], 0
        for sq in seqs:
            b = a + len(sq.ids)
            sq.cache.write(i, sq.pos, latent[a:b], k_pe[a:b])
            outs.append(self._attend(i, lw, sq.cache, sq.pos, q_nope[a:b], q_pe[a:b]))
            a = b
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return linear(o.reshape(t, -1), lw.o_proj)

    def _attend(self, i: int, lw: LayerWeights, cache: KVCache, pos: int, q_nope: torch.Tensor,
                q_pe: torch.Tensor) -> torch.Tensor:
        """One sequence's attention output [t, heads, v] for its t new rows at pos.. (already in its cache)."""
        cfg = self.cfg
        t, nh = q_nope.shape[0], cfg.num_attention_heads
        s = pos + t
        lat, kpe = cache.latent[i][:s], cache.k_pe[i][:s]
        if t == 1 and lw.mla is not None and lat.dtype == torch.float32 and lw.mla.fused():
            # a decoded token: k_b, the scores over the whole cache and v_b in one kernel call on the cores
            return lw.mla(q_nope[0], q_pe[0], lat, kpe, cfg.softmax_scale)[None]
        if (pos == 0 and t > 1) or t >= MHA_MIN_TOKENS:
            # Prefill (from empty, or a long chunk after a cached prefix): expand keys/values per head, the plain MHA
            # form; cheaper than the absorbed one from about 170 new tokens on (per key: 8.4M MACs to expand against
            # 49K per query saved)
            o = _expanded_attention(lw, q_nope, q_pe, lat, kpe, pos, cfg.softmax_scale)
        else:
            # Absorbed form (decode, or a few new tokens after a cached prefix): attend in the latent space.
            q_lat = torch.bmm(q_nope.transpose(0, 1), lw.w_uk) if lw.uk_q is None else \
                lw.uk_q(q_nope.transpose(0, 1)).to(lat.dtype)  # [h, t, kv_lora]
            long = nh * t * s * cfg.kv_lora_rank > PARALLEL_ATTENTION_MACS
            parts = min(full_threads(), s // 256) if long and t == 1 and lat.device.type == "cpu" else 1
            if parts > 1:  # a decode step against a long cache: keys split over the cores
                pl = _split_decode_attention(q_lat, q_pe.transpose(0, 1), lat, kpe, cfg.softmax_scale, parts)
            else:
                with torch_threads(full_threads() if long else 0):  # a decode step runs torch at 1 thread
                    pl = _absorbed_attention(q_lat, q_pe.transpose(0, 1), lat, kpe, pos, cfg.softmax_scale)
            o = (torch.bmm(pl, lw.w_uv.transpose(1, 2)) if lw.uv_q is None else lw.uv_q(pl).to(lat.dtype)).transpose(0, 1)
        return o

    def _ffn(self, i: int, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        if lw.dense is not None:
            return swiglu(x, *lw.dense)
        assert lw.router is not None
        idx, w = self.router(x, lw.router, lw.router_bias)
        begin = getattr(self.experts, "begin", None)
        if begin is not None and x.is_cuda and lw.shared is not None:
            # routed experts run on the CPU (and GPU cache) while the GPU computes the shared expert
            pending = begin(i, x, idx, w.to(x.dtype))
            shared = swiglu(x, *lw.shared)
            return pending.result() + shared
        y = self.experts.forward(i, x, idx, w.to(x.dtype))
        if lw.shared is not None:
            y = y + swiglu(x, *lw.shared)
        return y

    def forward(self, ids: torch.Tensor | list[int], cache: KVCache, pos: int | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Run tokens `ids` at positions pos.. (default: the cache length); returns fp32 logits [T, vocab]
        ([1, vocab] with last_only). The batch-of-one case of :meth:`forward_batch`."""
        ids_l = ids.view(-1).tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return self.forward_batch([SeqRows(ids_l, cache, cache.length if pos is None else pos, last_only)])[0]

    @torch.inference_mode()
    def forward_batch(self, seqs: Sequence[SeqRows]) -> list[torch.Tensor]:
        """One forward step shared by several sequences (continuous batching): embeddings, norms, projections,
        dense FFN, router and routed experts run once over all their rows concatenated (each expert once for
        every row routed to it); attention runs per sequence against its own cache, causal within its rows.
        Returns each sequence's fp32 logits: [len(ids), vocab], or [1, vocab] with last_only."""
        if not seqs or any(len(sq.ids) == 0 for sq in seqs):
            raise ValueError("forward_batch needs at least one sequence, each with at least one token")
        if len({id(sq.cache) for sq in seqs}) < len(seqs):
            raise ValueError("forward_batch: two sequences share one KV cache")
        t = sum(len(sq.ids) for sq in seqs)
        with torch_threads(1 if self.device.type == "cpu" and decode_step(t) else 0):
            return self._forward(seqs)

    def _forward(self, seqs: Sequence[SeqRows]) -> list[torch.Tensor]:
        dev = self.device
        ids_t = torch.tensor([tok for sq in seqs for tok in sq.ids], dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(sq.pos, sq.pos + len(sq.ids)) for sq in seqs]).to(dev)
        cos, sin = self._rope(positions)
        # rows that go on past the last layer's attention: every row of a sequence, or only its last
        ends = torch.tensor([len(sq.ids) for sq in seqs]).cumsum(0).tolist()
        keep = [r for sq, end in zip(seqs, ends)
                for r in ([end - 1] if sq.last_only else range(end - len(sq.ids), end))]
        h = self.embed[ids_t]
        eps = self.cfg.rms_norm_eps
        last = len(self.layers) - 1
        for i, lw in enumerate(self.layers):
            h = h + self._attention(i, lw, rms_norm(h, lw.attn_norm, eps), seqs, cos, sin)
            if i == last and len(keep) < h.shape[0]:  # the last FFN (experts) only for rows whose logits are needed
                h = h[keep[0]:] if keep == list(range(keep[0], h.shape[0])) else h[torch.tensor(keep, device=dev)]
            h = h + self._ffn(i, lw, rms_norm(h, lw.ffn_norm, eps))
        for sq in seqs:
            sq.cache.length = sq.pos + len(sq.ids)
        logits = linear(rms_norm(h, self.norm, eps), self.lm_head).float()
        return list(logits.split([1 if sq.last_only else len(sq.ids) for sq in seqs]))
