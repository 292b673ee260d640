"""Building the routed-expert backend: plan (or refuse), then set up the tiers the plan asks for.

The application hands over what offload cannot know itself: the expert layout, the model's footprint, the
compute device and dtype, and (for the disk tier's prefetch) the routers.
"""
from __future__ import annotations

import atexit
from typing import Callable

import torch

from offload.cache import FrequencyPolicy
from offload.executor import OffloadExperts, RouterPredictor
from offload.expert_layout import ExpertLayout
from offload.options import Budgets, OffloadOptions
from offload.planner import ModelFootprint, Plan, plan_placement, stats_path
from offload.probe import probe_hardware
from offload.routing_stats import RoutingStats
from offload.store import DeviceCache, ExpertStore

# each MoE layer's router: (weight [n_experts, hidden], score-correction bias [n_experts] or None)
Routers = dict[int, tuple[torch.Tensor, "torch.Tensor | None"]]


def build_expert_backend(layout: ExpertLayout, model: ModelFootprint, device: torch.device, dtype: torch.dtype,
                         budgets: Budgets = Budgets(), options: OffloadOptions | None = None,
                         plan: Plan | None = None, routers: Callable[[], Routers] | None = None,
                         scoring: str = "sigmoid", progress: Callable[[int], None] | None = None) -> OffloadExperts:
    """The tiered expert backend for `layout`: plans with the saved routing statistics unless `plan` is given
    (PlanError when it cannot fit), fills the RAM store (progress(nbytes) once per routed expert loaded up front)
    and the device cache. routers() is called only when the disk tier prefetches (`scoring`: the routers' score
    function, "sigmoid" or "softmax")."""
    options = options or OffloadOptions()
    path = stats_path(options, model.model_id)
    prior = RoutingStats.load_or_new(path, model.n_layers, layout.n_experts)
    plan = plan or plan_placement(model, layout, device, dtype, probe_hardware(device), prior, budgets, options)
    dev_set = set(plan.device_experts)
    host_keys = [k for k in layout.keys() if k not in dev_set]
    policy = FrequencyPolicy(prior=prior.as_prior(layout.moe_layers))
    store = ExpertStore(layout, n_slots=plan.store_slots if plan.experts_on == "disk" else None, pin=plan.pinned,
                        policy=policy, io_threads=int(options.io_threads), direct_io=bool(options.direct_io),
                        keys=host_keys, tier=plan.experts_on, staging=plan.staging_slots,
                        # interleaved layouts for the CPU kernels where nothing else reads the slots (no GPU)
                        repack=device.type == "cpu" and bool(options.kernels))
    if plan.experts_on == "ram":
        store.preload(progress=progress)
    elif options.prewarm and prior.tokens.sum() > 0:  # the cache starts with the experts earlier runs used most
        store.preload([k for k in prior.hot(len(dev_set) + store.cache_slots, layout.moe_layers)
                       if k not in dev_set], progress=progress)
    cache = None
    if plan.device_experts:
        cache = DeviceCache(layout, device, dtype)
        for k in plan.device_experts:
            cache.add(k, store.read_copy(k))
    predictor = None
    if plan.experts_on == "disk" and options.prefetch and routers is not None:
        predictor = RouterPredictor(routers(), scoring)
    ex = OffloadExperts(layout, store, device, dtype, device_cache=cache,
                        routing=RoutingStats(model.n_layers, layout.n_experts, model.model_id),
                        predictor=predictor, top_k=model.top_k,
                        gpu_prefill_min_tokens=int(options.gpu_prefill_min_tokens),
                        lookahead=int(options.lookahead), prefetch=bool(options.prefetch),
                        use_kernels=bool(options.kernels),
                        stats_path=path if options.save_routing_stats else None, plan=plan)
    atexit.register(ex.close)
    return ex
