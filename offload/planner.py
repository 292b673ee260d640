"""Placement planner: what goes on the GPU, in RAM and on disk, whether it fits, and how fast decode will be.

The GPU (or, with --cpu-only, RAM) holds everything but the routed experts: attention, norms, router, shared
experts, dense layers, embeddings and head, plus the KV cache and a workspace. Routed experts live in RAM
(resident) or stay in the checkpoint file with a bounded RAM cache in front (disk tier); VRAM left over holds the
most used experts (from saved routing statistics). A plan that cannot fit raises PlanError before anything loads.
"""
from __future__ import annotations

import atexit
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from k2local.config import ModelConfig
from k2local.errors import K2Error
from offload.cache import FrequencyPolicy
from offload.expert_layout import ExpertLayout, layout_for
from offload.routing_stats import RoutingStats, default_stats_path
from offload.store import ALIGN, DeviceCache, ExpertStore, FileReader, Key, device_expert_bytes, plan_slot

GiB = 1 << 30
MiB = 1 << 20
MIN_DISK_SLOTS = 4  # plus top_k: a decode step's experts of one layer held together, + 2 reads in flight
PER_LAYER_OVERHEAD_S = 1.5e-4  # Python + kernel-launch cost per decoder layer and token (measured order)


def human(n: float) -> str:
    """Bytes as GiB / MiB / KiB with two decimals."""
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


class PlanError(K2Error):
    """The model cannot be placed within the memory budgets; the message says what to change."""


@dataclass
class Hardware:
    ram_total: int
    ram_available: int
    vram_total: int = 0
    vram_free: int = 0
    gpu_name: str | None = None
    cpus: int = 1


def probe_hardware(device: torch.device | None = None) -> Hardware:
    vm = psutil.virtual_memory()
    hw = Hardware(vm.total, vm.available, cpus=os.cpu_count() or 1)
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        dev = device if device is not None and device.index is not None else torch.device("cuda", 0)
        free, total = torch.cuda.mem_get_info(dev)
        hw.vram_free, hw.vram_total, hw.gpu_name = free, total, torch.cuda.get_device_name(dev)
    return hw


@dataclass
class Bandwidths:
    """GB/s. cpu_expert: the expert kernel's weight-byte throughput for one decode token (None: not measured)."""

    ram: float
    disk: float
    cpu_expert: float | None = None
    gpu: float | None = None
    h2d: float | None = None
    disk_direct: bool = True  # False: the page cache may have served the disk measurement

    @property
    def cpu_effective(self) -> float:
        return min(self.ram, self.cpu_expert) if self.cpu_expert else self.ram * 0.5


@dataclass
class Plan:
    """Where everything goes, sizes per tier, and the expected share of expert uses each tier serves."""

    model: str
    device: str
    dtype: str
    n_moe_layers: int
    n_experts: int
    top_k: int
    resident_bytes: int  # non-expert weights at the compute dtype
    resident_parts: dict[str, int]
    kv_bytes: int
    kv_tokens: int
    workspace_bytes: int
    expert_bytes_total: int  # as stored
    experts_on: str  # "ram" | "disk"
    ram_budget: int
    ram_available: int
    store_slots: int
    store_bytes: int
    slot_bytes: int
    pinned: bool
    device_experts: list[Key]
    device_expert_bytes: int
    vram_budget: int
    disk_bytes: int  # expert bytes that may have to come from disk
    files: list[str]
    p_device: float
    p_ram: float
    p_disk: float
    bytes_per_token: float  # expert bytes computed per decoded token
    non_expert_read_per_token: int
    n_layers: int
    notes: list[str] = field(default_factory=list)
    stats_path: str | None = None

    @property
    def cpu_only(self) -> bool:
        return self.device == "cpu"

    def tier_rows(self) -> list[tuple[str, str, int, str]]:
        """(tier, what, bytes, note) rows for the plan table."""
        dev = "GPU" if not self.cpu_only else "RAM (compute)"
        rows = [(dev, f"{name}", n, "") for name, n in self.resident_parts.items()]
        rows.append((dev, f"KV cache ({self.kv_tokens} tokens)", self.kv_bytes, ""))
        rows.append((dev, "workspace", self.workspace_bytes, ""))
        if self.device_experts:
            rows.append((dev, f"expert cache: {len(self.device_experts)} hot experts", self.device_expert_bytes,
                         f"{self.p_device:.0%} of expert uses"))
        if self.experts_on == "ram":
            rows.append(("RAM", f"routed experts, resident ({self.store_slots} experts)"
                         + (", pinned" if self.pinned else ""), self.store_bytes, f"{self.p_ram:.0%} of uses"))
        else:
            rows.append(("RAM", f"expert cache over disk ({self.store_slots} slots)" + (", pinned" if self.pinned
                                                                                        else ""),
                         self.store_bytes, f"{self.p_ram:.0%} of uses expected"))
            rows.append(("disk", f"routed experts streamed from {len(self.files)} file(s)", self.disk_bytes,
                         f"{self.p_disk:.0%} of uses expected"))
        return rows

    @property
    def device_total(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.workspace_bytes + self.device_expert_bytes


# ---------------------------------------------------------------------------------------------- sizes
def non_expert_parts(cfg: ModelConfig, dtype_bytes: int, weight_bytes: float | None = None) -> dict[str, int]:
    """Bytes of everything the model keeps on its compute device, by kind (router in float32).
    weight_bytes: bytes per weight of matrices kept block-quantized (attention, shared, dense, head)."""
    wb = dtype_bytes if weight_bytes is None else weight_bytes
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    attn = norms = dense = router = shared = 0
    for i in range(cfg.num_hidden_layers):
        norms += 2 * h
        if cfg.q_lora_rank:
            attn += h * cfg.q_lora_rank + cfg.q_lora_rank * nh * cfg.qk_head_dim
            norms += cfg.q_lora_rank
        else:
            attn += h * nh * cfg.qk_head_dim
        attn += h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * nh * (
            cfg.qk_nope_head_dim + cfg.v_head_dim) + nh * cfg.v_head_dim * h
        norms += cfg.kv_lora_rank
        if cfg.is_moe_layer(i):
            router += cfg.n_routed_experts * (h + 1)
            shared += 3 * h * cfg.moe_intermediate_size * cfg.n_shared_experts
        else:
            dense += 3 * h * cfg.intermediate_size
    embed = cfg.vocab_size * h * dtype_bytes
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h * wb
    return {"attention": int(attn * wb), "shared experts": int(shared * wb),
            "dense FFN layers": int(dense * wb), "norms": (norms + h) * dtype_bytes,
            "router (fp32)": router * 4, "embeddings + head": int(embed + head)}


def kv_cache_tokens(max_context: int) -> int:
    """The model's KV cache starts at 256 positions and doubles: the capacity reached for max_context."""
    cap = 256
    while cap < max_context:
        cap *= 2
    return cap


def workspace_bytes(cfg: ModelConfig, dtype_bytes: int, chunk: int = 512) -> int:
    """Activations of one prefill chunk (the generator's default), generously."""
    h, nh = cfg.hidden_size, cfg.num_attention_heads
    per_tok = 16 * h + 4 * nh * (cfg.qk_head_dim + cfg.v_head_dim) + 3 * cfg.moe_intermediate_size * \
        cfg.num_experts_per_tok + 2 * cfg.intermediate_size
    return chunk * per_tok * max(dtype_bytes, 4) + 2 * nh * chunk * chunk * 4 + 8 * cfg.vocab_size + 64 * MiB


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _model_id(source: Any) -> str:
    cfg = source.config
    return f"{Path(str(source.path)).name}-{cfg.num_hidden_layers}L-{cfg.n_routed_experts}E"


def _pick(opts: Any, source: Any, device: torch.device | None, dtype: torch.dtype | None
          ) -> tuple[torch.device, torch.dtype]:
    from k2local.engine import _pick_device, _pick_dtype  # noqa: PLC0415 (same rules as Engine.load)

    dev = device if device is not None else _pick_device(opts)
    if opts.cpu_only and dev.type != "cpu":
        raise PlanError(f"--cpu-only conflicts with device {dev}")
    return dev, (dtype if dtype is not None else _pick_dtype(opts, dev, source))


# ---------------------------------------------------------------------------------------------- planning
def make_plan(source: Any, opts: Any, device: torch.device | None = None, dtype: torch.dtype | None = None,
              hw: Hardware | None = None, stats: RoutingStats | None = None,
              layout: ExpertLayout | None = None) -> Plan:
    """Place the model for `opts` (LoadOptions); PlanError with what to change when it cannot fit."""
    cfg: ModelConfig = source.config
    device, dtype = _pick(opts, source, device, dtype)
    hw = hw or probe_hardware(device)
    layout = layout or layout_for(source)
    db = _dtype_bytes(dtype)
    extra = getattr(opts, "extra", {}) or {}
    quantized = getattr(opts, "quantized_weights", None)
    if quantized is None:  # the CPU keeps big GGUF matrices block-quantized by default (k2local.linear)
        quantized = device.type == "cpu"
    from k2local.linear import quantized_bytes_per_param  # noqa: PLC0415

    wbytes = quantized_bytes_per_param(source, cfg) if quantized else None
    parts = non_expert_parts(cfg, db, wbytes)
    resident = sum(parts.values())
    max_ctx = min(opts.max_context or 8192, cfg.max_position_embeddings)
    kv_tok = kv_cache_tokens(max_ctx)
    kv = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * db * kv_tok
    ws = workspace_bytes(cfg, db)
    on_device = resident + kv + ws
    moe_layers = layout.moe_layers
    n_layers = cfg.num_hidden_layers
    if stats is None:
        sp = extra.get("routing_stats") or default_stats_path(_model_id(source))
        stats = RoutingStats.load_or_new(sp, n_layers, layout.n_experts)
    notes: list[str] = []
    gib = human

    # ---- device tier
    device_keys: list[Key] = []
    dev_expert_bytes = 0
    if device.type == "cuda":
        vram = int(opts.gpu_mem * GiB) if opts.gpu_mem else max(0, hw.vram_free - GiB // 2)
        if opts.gpu_mem and hw.vram_total and opts.gpu_mem * GiB > hw.vram_free:
            notes.append(f"--gpu-mem {opts.gpu_mem} GiB is more than the {gib(hw.vram_free)} free now")
        if on_device > vram:
            raise PlanError(
                f"the non-expert weights ({gib(resident)} at {str(dtype).replace('torch.', '')}), KV cache for "
                f"{max_ctx} tokens ({gib(kv)}) and workspace ({gib(ws)}) need {gib(on_device)} of VRAM; "
                f"{gib(vram)} is available. Use --cpu-only, a smaller --max-context, or a larger --gpu-mem.")
        room = vram - on_device
        if extra.get("device_cache_experts") is not None:
            want = int(extra["device_cache_experts"])
        else:
            each = max(device_expert_bytes(layout.entry(*k), device, dtype) for k in
                       [(moe_layers[0], 0)]) if moe_layers else 1
            want = room // max(each, 1)
        device_keys = _fill_device(layout, stats, device, dtype, want, room)
    else:
        vram = 0
        n_dev = int(extra.get("device_cache_experts") or 0)  # testing aid: a "device cache" on the CPU
        if n_dev:
            device_keys = stats.hot(n_dev, moe_layers)
    dev_expert_bytes = sum(device_expert_bytes(layout.entry(*k), device, dtype) for k in device_keys)

    # ---- RAM tier
    dev_set = set(device_keys)
    host_keys = [k for k in layout.keys() if k not in dev_set]
    plans = {k: plan_slot(layout.entry(*k)) for k in host_keys}
    slot_bytes = max((p.size for p in plans.values()), default=ALIGN)
    slot_bytes = -(-slot_bytes // ALIGN) * ALIGN
    host_bytes = slot_bytes * len(host_keys)
    cpu_side = on_device if device.type == "cpu" else ws // 2  # host-side activations on a GPU run
    reserve = max(GiB // 2, hw.ram_total // 20)
    auto_budget = max(0, hw.ram_available - cpu_side - reserve)
    if opts.ram is not None:
        budget = int(opts.ram * GiB)
        if budget + cpu_side > hw.ram_available:
            notes.append(f"--ram {opts.ram} GiB plus {gib(cpu_side)} for the model is more than the "
                         f"{gib(hw.ram_available)} available now")
    else:
        budget = auto_budget
    if device.type == "cpu" and cpu_side + reserve > hw.ram_available:
        raise PlanError(f"the non-expert weights, KV cache and workspace need {gib(cpu_side)} of RAM on a "
                        f"CPU-only run; {gib(hw.ram_available)} is available. Lower --max-context or add a GPU.")
    experts_on = opts.experts_on
    if experts_on not in (None, "ram", "disk"):
        raise PlanError(f"--experts-on must be ram or disk, not {experts_on!r}")
    if experts_on is None:
        experts_on = "ram" if host_bytes <= budget else "disk"
    if experts_on == "ram":
        if host_bytes > budget:
            raise PlanError(
                f"the routed experts need {gib(host_bytes)} of RAM (beyond {len(device_keys)} on the GPU) but "
                f"the budget is {gib(budget)} ({'--ram' if opts.ram is not None else 'available RAM'}). "
                f"Use --experts-on disk to stream them from the checkpoint with a RAM cache, or raise --ram.")
        slots = len(host_keys)
    else:
        slots = min(len(host_keys), budget // slot_bytes)
        min_slots = min(len(host_keys), cfg.num_experts_per_tok + MIN_DISK_SLOTS - 2)
        if host_keys and slots < min_slots:
            raise PlanError(
                f"a RAM budget of {human(budget)} is below the {human(min_slots * slot_bytes)} the disk tier "
                f"needs ({min_slots} experts of {human(slot_bytes)}: one token's experts of a layer plus reads in "
                f"flight). Raise --ram.")
    store_bytes = slots * slot_bytes

    # ---- expected shares of expert uses
    p_dev = p_ram = 0.0
    for layer in moe_layers:
        d = stats.coverage(layer, [e for (lay, e) in device_keys if lay == layer])
        p_dev += d
    p_dev /= max(1, len(moe_layers))
    if experts_on == "ram":
        p_ram = 1.0 - p_dev
    else:
        cached = [k for k in stats.hot(slots + len(device_keys), moe_layers) if k not in dev_set][:slots]
        for layer in moe_layers:
            p_ram += stats.coverage(layer, [e for (lay, e) in cached if lay == layer])
        p_ram /= max(1, len(moe_layers))
    p_disk = max(0.0, 1.0 - p_dev - p_ram)
    per_tok = float(sum(cfg.num_experts_per_tok * layout.expert_bytes(layer) for layer in moe_layers))
    embed_rows = cfg.vocab_size * cfg.hidden_size * db
    pinned = device.type == "cuda" and bool(extra.get("pin", True))
    if pinned and store_bytes > hw.ram_total // 2:
        pinned = False
        notes.append("expert RAM is over half of physical memory: not pinned (big prefill batches copy slower)")
    return Plan(
        model=str(source.path), device=str(device), dtype=str(dtype).replace("torch.", ""),
        n_moe_layers=len(moe_layers), n_experts=layout.n_experts, top_k=cfg.num_experts_per_tok,
        resident_bytes=resident, resident_parts=parts, kv_bytes=kv, kv_tokens=kv_tok, workspace_bytes=ws,
        expert_bytes_total=layout.total_bytes, experts_on=experts_on, ram_budget=budget,
        ram_available=hw.ram_available, store_slots=slots, store_bytes=store_bytes, slot_bytes=slot_bytes,
        pinned=pinned, device_experts=device_keys, device_expert_bytes=dev_expert_bytes, vram_budget=vram,
        disk_bytes=sum(layout.entry(*k).nbytes for k in host_keys) if experts_on == "disk" else 0,
        files=layout.files(), p_device=p_dev, p_ram=p_ram, p_disk=p_disk, bytes_per_token=per_tok,
        non_expert_read_per_token=max(0, resident - embed_rows // (1 if cfg.tie_word_embeddings else 2)),
        n_layers=n_layers, notes=notes,
        stats_path=str(extra.get("routing_stats") or default_stats_path(_model_id(source))),
    )


def _fill_device(layout: ExpertLayout, stats: RoutingStats, device: torch.device, dtype: torch.dtype,
                 want: int, room: int) -> list[Key]:
    """The hottest experts that fit in `room` bytes (at most `want`)."""
    keys: list[Key] = []
    used = 0
    for k in stats.hot(min(want, len(layout.keys())), layout.moe_layers):
        b = device_expert_bytes(layout.entry(*k), device, dtype)
        if used + b > room:
            break
        keys.append(k)
        used += b
    return keys


def predict_decode_tps(plan: Plan, bw: Bandwidths) -> float:
    """Decode tokens/s: every byte read per token over the bandwidth of the tier it comes from."""
    b = plan.bytes_per_token
    cpu = max(bw.cpu_effective, 1e-3) * 1e9
    t = b * plan.p_ram / cpu + b * plan.p_disk * (1 / (max(bw.disk, 1e-3) * 1e9) + 1 / cpu)
    if plan.cpu_only:
        t += plan.non_expert_read_per_token / (max(bw.ram, 1e-3) * 1e9)
    else:
        gpu = max(bw.gpu or 1000.0, 1.0) * 1e9
        t += plan.non_expert_read_per_token / gpu + b * plan.p_device / gpu
    t += PER_LAYER_OVERHEAD_S * plan.n_layers
    return 1.0 / t


def decode_breakdown(plan: Plan) -> dict[str, float]:
    """Expert bytes per decoded token by tier."""
    b = plan.bytes_per_token
    return {"device": b * plan.p_device, "ram": b * plan.p_ram, "disk": b * plan.p_disk}


# ---------------------------------------------------------------------------------------------- measuring
def _best(f, reps: int = 3) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return max(best, 1e-9)


def measure_ram_bandwidth(nbytes: int = 256 * MiB) -> float:
    """RAM read GB/s with all threads: the expert kernels' own streaming loop when built, else a torch sum."""
    try:
        from offload import kernels  # noqa: PLC0415

        if kernels.available():
            bw = kernels.read_bandwidth(nbytes=nbytes, reps=3)
            if bw > 0:
                return bw
    except ImportError:
        pass
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _best(lambda: a.sum()) / 1e9


def measure_disk_bandwidth(layout: ExpertLayout, max_bytes: int = 256 * MiB, max_s: float = 1.0
                           ) -> tuple[float, bool]:
    """GB/s reading whole experts the way the disk tier does (O_DIRECT when possible); (GB/s, direct?)."""
    reader = FileReader(direct=True)
    keys = layout.keys()
    if not keys or not layout.files():
        return 0.0, False
    step = max(1, len(keys) // 97)
    order = keys[::step] + keys
    plan0 = max((plan_slot(layout.entry(*k)) for k in keys[:8]), key=lambda p: p.size)
    buf = torch.empty(plan0.size + 2 * ALIGN, dtype=torch.uint8)
    start = (-buf.data_ptr()) % ALIGN
    arr = buf[start:].numpy()
    total, t0 = 0, time.perf_counter()
    try:
        for k in order:
            plan = plan_slot(layout.entry(*k))
            if plan.size > arr.size:
                continue
            for (soff, foff, length), seg, (_, need) in zip(plan.reads, layout.entry(*k).segments, plan.data):
                if seg.path is not None:
                    reader.read_into(seg.path, foff, memoryview(arr[soff:soff + length]),  # type: ignore[arg-type]
                                     need + seg.offset - foff)
                    total += need
            if total >= max_bytes or time.perf_counter() - t0 > max_s:
                break
        direct = reader.direct_files > 0
    finally:
        reader.close()
    return total / max(time.perf_counter() - t0, 1e-9) / 1e9, direct


def measure_cpu_expert(layout: ExpertLayout, dtype: torch.dtype = torch.float32, max_s: float = 1.0) -> float:
    """Weight GB/s of the CPU expert path for one decode token (k experts of the first MoE layer, resident)."""
    from offload.executor import OffloadExperts  # noqa: PLC0415

    if not layout.moe_layers:
        return 0.0
    layer = layout.moe_layers[0]
    n = max(1, min(layout.n_experts, (64 * MiB) // max(1, layout.expert_bytes(layer))))
    k = min(n, 8)
    store = ExpertStore(layout, keys=[(layer, e) for e in range(n)], io_threads=2)
    try:
        store.preload()
        ex = OffloadExperts(layout, store, "cpu", dtype, prefetch=False)
        x = torch.randn(1, layout.entry(layer, 0).formats[0].cols, dtype=dtype)
        w = torch.full((1, k), 1.0 / k, dtype=dtype)
        groups = [torch.arange(s, s + k).view(1, k) for s in range(0, n - k + 1, k)]
        ex.forward(layer, x, groups[0], w)  # warm-up
        best, t_end, i = float("inf"), time.perf_counter() + max_s, 0
        while i < 3 * len(groups) and (i < 3 or time.perf_counter() < t_end):
            t = time.perf_counter()
            ex.forward(layer, x, groups[i % len(groups)], w)
            best = min(best, time.perf_counter() - t)
            i += 1
        return k * layout.expert_bytes(layer) / best / 1e9
    finally:
        store.close()


def measure_gpu(device: torch.device) -> tuple[float | None, float | None]:
    """(device memory GB/s, pinned host-to-device GB/s); None without CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None, None
    n = 256 * MiB
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)

    def copy() -> None:
        b.copy_(a)
        torch.cuda.synchronize(device)
    gpu = 2 * n / _best(copy) / 1e9
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def h2d() -> None:
        a.copy_(h, non_blocking=True)
        torch.cuda.synchronize(device)
    return gpu, n / _best(h2d) / 1e9


def measure_bandwidths(layout: ExpertLayout, device: torch.device, dtype: torch.dtype = torch.float32
                       ) -> Bandwidths:
    """Quick measurements (about a second): RAM, disk (as the disk tier reads), CPU expert path, GPU."""
    ram = measure_ram_bandwidth()
    disk, direct = measure_disk_bandwidth(layout)
    cpu_dtype = dtype if device.type == "cpu" else torch.float32
    try:
        cpu = measure_cpu_expert(layout, cpu_dtype)
    except Exception:  # noqa: BLE001 (a missing codec should not stop the plan)
        cpu = None
    gpu, h2d = measure_gpu(device)
    return Bandwidths(ram=ram, disk=disk, cpu_expert=cpu, gpu=gpu, h2d=h2d, disk_direct=direct)


# ---------------------------------------------------------------------------------------------- building
def build_backend(source: Any, opts: Any, device: torch.device, dtype: torch.dtype, plan: Plan | None = None,
                  progress: Callable[[int], None] | None = None):
    """The routed-expert backend for `opts` (LoadOptions): plan (or refuse), then set up the tiers.
    progress(nbytes) is called once per routed expert loaded up front."""
    from offload.executor import OffloadExperts, RouterPredictor  # noqa: PLC0415

    extra = getattr(opts, "extra", {}) or {}
    if extra.get("experts_backend") == "dense":
        from offload.experts_dense import DenseExperts  # noqa: PLC0415

        return DenseExperts.from_source(source, dtype=dtype, device=device, progress=progress)
    layout = layout_for(source)
    cfg = source.config
    stats_path = extra.get("routing_stats") or str(default_stats_path(_model_id(source)))
    prior = RoutingStats.load_or_new(stats_path, cfg.num_hidden_layers, layout.n_experts)
    plan = plan or make_plan(source, opts, device, dtype, stats=prior, layout=layout)
    dev_set = set(plan.device_experts)
    host_keys = [k for k in layout.keys() if k not in dev_set]
    policy = FrequencyPolicy(prior=prior.as_prior(layout.moe_layers))
    store = ExpertStore(layout, n_slots=plan.store_slots if plan.experts_on == "disk" else None, pin=plan.pinned,
                        policy=policy, io_threads=int(extra.get("io_threads", 4)),
                        direct_io=bool(extra.get("direct_io", True)), keys=host_keys, tier=plan.experts_on)
    if plan.experts_on == "ram":
        store.preload(progress=progress)
    cache = None
    if plan.device_experts:
        cache = DeviceCache(layout, device, dtype)
        for k in plan.device_experts:
            cache.add(k, store.read_copy(k))
    predictor = None
    if plan.experts_on == "disk" and extra.get("prefetch", True):
        routers = {}
        for layer in layout.moe_layers:
            m = f"model.layers.{layer}.mlp."
            b = m + "gate.e_score_correction_bias"
            routers[layer] = (source.get(m + "gate.weight", torch.bfloat16),
                              source.get(b, torch.float32) if source.has(b) else None)
        predictor = RouterPredictor(routers, cfg.scoring_func)
    ex = OffloadExperts(layout, store, device, dtype, device_cache=cache,
                        routing=RoutingStats(cfg.num_hidden_layers, layout.n_experts, _model_id(source)),
                        predictor=predictor, top_k=cfg.num_experts_per_tok,
                        gpu_prefill_min_tokens=int(extra.get("gpu_prefill_min_tokens", 64)),
                        lookahead=int(extra.get("lookahead", 2)), prefetch=bool(extra.get("prefetch", True)),
                        use_kernels=bool(extra.get("kernels", True)),
                        stats_path=stats_path if extra.get("save_routing_stats", True) else None)
    ex.plan = plan  # type: ignore[attr-defined]
    atexit.register(ex.close)
    return ex
