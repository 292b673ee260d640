"""Placement planner: what goes on the compute device, in RAM and on disk, whether it fits, and how fast decode
will be, from numbers only.

The GPU (or, with --cpu-only, RAM) holds everything but the routed experts: the application sizes that part (a
`ModelFootprint`: weights by kind, KV cache, workspace); the planner never sees tensor names. Routed experts live
in RAM (resident) or stay in the checkpoint file with a bounded RAM cache in front (disk tier); VRAM left over
holds the most used experts (from saved routing statistics). A plan that cannot fit raises PlanError before
anything loads. Measuring the machine is offload.probe's job; building the tiers, offload.backend's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from offload.errors import PlanError
from offload.expert_layout import ExpertLayout
from offload.options import Budgets, OffloadOptions
from offload.routing_stats import RoutingStats, default_stats_path
from offload.store import ALIGN, Key, device_expert_bytes, plan_slot

__all__ = ["GiB", "MiB", "Bandwidths", "Hardware", "ModelFootprint", "Plan", "PlanError", "decode_breakdown",
           "human", "plan_placement", "predict_decode_tps", "ram_reserve", "staging_slots", "stats_path"]

GiB = 1 << 30
MiB = 1 << 20
MIN_DISK_SLOTS = 4  # plus top_k: a decode step's experts of one layer held together, + 2 reads in flight
# Per decoder layer and token: attention math, norms, rope, router, Python and torch dispatch. bench/decode.py's
# breakdown on a 2-core Xeon: 1.07 ms a layer (`disk` shape, hidden 4096) and 1.4 ms (`k2layer`, hidden 7168).
PER_LAYER_OVERHEAD_S = 1.0e-3
# Reads through the expert store against the raw probe's best (the disk busy at 84-93% of it while it reads,
# bench/decode.py --modes disk on the 2-core Xeon's virtual disk)
DISK_EFFICIENCY = 0.85
# Extra bytes read by next-layer prefetches that the layer then does not use (70-75% of them are used there)
PREFETCH_WASTE = 0.2


def human(n: float) -> str:
    """Bytes as GiB / MiB / KiB with two decimals."""
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


@dataclass
class Hardware:
    """The machine's memory in bytes (offload.probe.probe_hardware measures it) and its CPU count."""

    ram_total: int
    ram_available: int
    vram_total: int = 0
    vram_free: int = 0
    gpu_name: str | None = None
    cpus: int = 1
    ram_limit: int | None = None  # a cgroup memory limit on this process (ram_total and ram_available obey it)


@dataclass
class Bandwidths:
    """GB/s. cpu_expert: the expert kernel's weight-byte throughput for one decode token (None: not measured)."""

    ram: float
    disk: float
    cpu_expert: float | None = None
    gpu: float | None = None
    h2d: float | None = None
    disk_direct: bool = True  # False: the page cache may have served the disk measurement
    disk_parallel: float | None = None  # raw O_DIRECT reads of an expert's size, several in flight
    disk_one_stream: float | None = None  # the same, one read at a time

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
    staging_slots: int = 0  # disk tier: RAM slots for reads that hold no cache place (prefetches, cold misses)

    @property
    def hit_rate(self) -> float:
        """The share of host expert uses the plan expects the RAM tier to serve (all of them when resident)."""
        host = 1.0 - self.p_device
        return self.p_ram / host if host > 0 else 1.0

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
            rows.append(("RAM", f"expert cache over disk ({self.store_slots} slots + {self.staging_slots} staging)"
                         + (", pinned" if self.pinned else ""),
                         self.store_bytes, f"{self.p_ram:.0%} of uses expected (hit rate {self.hit_rate:.0%})"))
            rows.append(("disk", f"routed experts streamed from {len(self.files)} file(s)", self.disk_bytes,
                         f"{self.p_disk:.0%} of uses expected"))
        return rows

    @property
    def device_total(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.workspace_bytes + self.device_expert_bytes


@dataclass(frozen=True)
class ModelFootprint:
    """The model as the planner sees it: the bytes of everything that is not a routed expert, sized by the
    application at the compute dtype, and the few shape numbers the plan and the speed model need."""

    name: str  # shown in the plan's title (the checkpoint path)
    model_id: str  # names the model's routing statistics file
    resident_parts: dict[str, int]  # non-expert weights on the compute device, by kind
    kv_bytes: int  # KV cache at kv_tokens positions
    kv_tokens: int
    max_context: int  # the context asked for (named when the device cannot hold it)
    workspace_bytes: int  # activations of one prefill chunk
    non_expert_read_per_token: int  # non-expert bytes read per decoded token
    n_layers: int  # decoder layers
    top_k: int  # routed experts per token

    @property
    def resident_bytes(self) -> int:
        return sum(self.resident_parts.values())


# ---------------------------------------------------------------------------------------------- planning
def stats_path(options: OffloadOptions, model_id: str) -> str:
    """The routing statistics file: the one named in the options, else the model's file in the cache."""
    return str(options.routing_stats or default_stats_path(model_id))


def plan_placement(model: ModelFootprint, layout: ExpertLayout, device: torch.device, dtype: torch.dtype,
                   hw: Hardware, stats: RoutingStats, budgets: Budgets = Budgets(),
                   options: OffloadOptions | None = None) -> Plan:
    """Place `model`'s routed experts (`layout`) and the rest on `device` / RAM / disk within `budgets`, the hottest
    experts (by `stats`) first on the device; PlanError with what to change when it cannot fit."""
    options = options or OffloadOptions()
    parts = model.resident_parts
    resident = model.resident_bytes
    max_ctx, kv, ws = model.max_context, model.kv_bytes, model.workspace_bytes
    on_device = resident + kv + ws
    moe_layers = layout.moe_layers
    notes: list[str] = []
    gib = human

    # ---- device tier
    device_keys: list[Key] = []
    dev_expert_bytes = 0
    if device.type == "cuda":
        vram = int(budgets.gpu_mem * GiB) if budgets.gpu_mem else max(0, hw.vram_free - GiB // 2)
        if budgets.gpu_mem and hw.vram_total and budgets.gpu_mem * GiB > hw.vram_free:
            notes.append(f"--gpu-mem {budgets.gpu_mem} GiB is more than the {gib(hw.vram_free)} free now")
        if on_device > vram:
            raise PlanError(
                f"the non-expert weights ({gib(resident)} at {str(dtype).replace('torch.', '')}), KV cache for "
                f"{max_ctx} tokens ({gib(kv)}) and workspace ({gib(ws)}) need {gib(on_device)} of VRAM; "
                f"{gib(vram)} is available. Use --cpu-only, a smaller --max-context, or a larger --gpu-mem.")
        room = vram - on_device
        if options.device_cache_experts is not None:
            want = int(options.device_cache_experts)
        else:
            each = max(device_expert_bytes(layout.entry(*k), device, dtype) for k in
                       [(moe_layers[0], 0)]) if moe_layers else 1
            want = room // max(each, 1)
        device_keys = _fill_device(layout, stats, device, dtype, want, room)
    else:
        vram = 0
        n_dev = int(options.device_cache_experts or 0)  # testing aid: a "device cache" on the CPU
        if n_dev:
            device_keys = stats.hot(n_dev, moe_layers)
    dev_expert_bytes = sum(device_expert_bytes(layout.entry(*k), device, dtype) for k in device_keys)

    # ---- RAM tier
    if hw.ram_limit is not None:
        notes.append(f"a memory limit of {gib(hw.ram_limit)} applies to this process (cgroup): RAM sized to it")
    dev_set = set(device_keys)
    host_keys = [k for k in layout.keys() if k not in dev_set]
    plans = {k: plan_slot(layout.entry(*k)) for k in host_keys}
    slot_bytes = max((p.size for p in plans.values()), default=ALIGN)
    slot_bytes = -(-slot_bytes // ALIGN) * ALIGN
    host_bytes = slot_bytes * len(host_keys)
    cpu_side = on_device if device.type == "cpu" else ws // 2  # host-side activations on a GPU run
    reserve = ram_reserve(hw)
    auto_budget = max(0, hw.ram_available - cpu_side - reserve)
    if budgets.ram is not None:
        budget = int(budgets.ram * GiB)
        if budget + cpu_side > hw.ram_available:
            notes.append(f"--ram {budgets.ram} GiB plus {gib(cpu_side)} for the model is more than the "
                         f"{gib(hw.ram_available)} available now")
    else:
        budget = auto_budget
    if device.type == "cpu" and cpu_side + reserve > hw.ram_available:
        raise PlanError(f"the non-expert weights, KV cache and workspace need {gib(cpu_side)} of RAM on a "
                        f"CPU-only run; {gib(hw.ram_available)} is available. Lower --max-context or add a GPU.")
    experts_on = budgets.experts_on
    if experts_on not in (None, "ram", "disk"):
        raise PlanError(f"--experts-on must be ram or disk, not {experts_on!r}")
    if experts_on is None:
        experts_on = "ram" if host_bytes <= budget else "disk"
    if experts_on == "ram":
        if host_bytes > budget:
            raise PlanError(
                f"the routed experts need {gib(host_bytes)} of RAM (beyond {len(device_keys)} on the GPU) but "
                f"the budget is {gib(budget)} ({'--ram' if budgets.ram is not None else 'available RAM'}). "
                f"Use --experts-on disk to stream them from the checkpoint with a RAM cache, or raise --ram.")
        slots = len(host_keys)
        staging = 0
    else:
        total = min(len(host_keys), budget // slot_bytes)
        min_slots = min(len(host_keys), model.top_k + MIN_DISK_SLOTS - 2)
        if host_keys and total < min_slots:
            raise PlanError(
                f"a RAM budget of {human(budget)} is below the {human(min_slots * slot_bytes)} the disk tier "
                f"needs ({min_slots} experts of {human(slot_bytes)}: one token's experts of a layer plus reads in "
                f"flight). Raise --ram.")
        staging = min(staging_slots(model.top_k), total // 2)
        slots = total - staging
    store_bytes = (slots + staging) * slot_bytes

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
    per_tok = float(sum(model.top_k * layout.expert_bytes(layer) for layer in moe_layers))
    pinned = device.type == "cuda" and bool(options.pin)
    if pinned and store_bytes > hw.ram_total // 2:
        pinned = False
        notes.append("expert RAM is over half of physical memory: not pinned (big prefill batches copy slower)")
    return Plan(
        model=model.name, device=str(device), dtype=str(dtype).replace("torch.", ""),
        n_moe_layers=len(moe_layers), n_experts=layout.n_experts, top_k=model.top_k,
        resident_bytes=resident, resident_parts=dict(parts), kv_bytes=kv, kv_tokens=model.kv_tokens,
        workspace_bytes=ws, expert_bytes_total=layout.total_bytes, experts_on=experts_on, ram_budget=budget,
        ram_available=hw.ram_available, store_slots=slots, store_bytes=store_bytes, slot_bytes=slot_bytes,
        pinned=pinned, device_experts=device_keys, device_expert_bytes=dev_expert_bytes, vram_budget=vram,
        disk_bytes=sum(layout.entry(*k).nbytes for k in host_keys) if experts_on == "disk" else 0,
        files=layout.files(), p_device=p_dev, p_ram=p_ram, p_disk=p_disk, bytes_per_token=per_tok,
        non_expert_read_per_token=model.non_expert_read_per_token, n_layers=model.n_layers, notes=notes,
        stats_path=stats_path(options, model.model_id), staging_slots=staging,
    )


def ram_reserve(hw: Hardware) -> int:
    """RAM the plan leaves free for the OS and everything else: 5% of it, at least 0.5 GiB (an eighth under a
    small cgroup limit)."""
    return max(min(GiB // 2, hw.ram_total // 8), hw.ram_total // 20)


def staging_slots(top_k: int) -> int:
    """Disk-tier slots beside the cache: one layer's prefetched experts plus two demand reads in flight."""
    return top_k + 2


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
    """Decode tokens/s from the bytes read per token and the bandwidth of the tier each comes from.

    The CPU computes every host expert (cached or just read) at its kernel rate. Experts not in the RAM cache are
    read from disk (PREFETCH_WASTE more for unused prefetches) at DISK_EFFICIENCY of the device's raw rate, the
    better of the probe's parallel and one-at-a-time figures. Those reads overlap the compute (the next layer's
    experts are prefetched while this one runs, a layer's misses are computed as they arrive), so the slower of
    the two sets the expert time. The non-expert matrices stream from RAM through the same kernels (CPU-only) or
    from VRAM; PER_LAYER_OVERHEAD_S covers the rest of each layer."""
    b = plan.bytes_per_token
    cpu = max(bw.cpu_effective, 1e-3) * 1e9
    disk = DISK_EFFICIENCY * (max(bw.disk_parallel or 0.0, bw.disk_one_stream or 0.0) or bw.disk)
    reads = b * plan.p_disk * (1 + PREFETCH_WASTE)
    expert_s = max(b * (plan.p_ram + plan.p_disk) / cpu, reads / (max(disk, 1e-3) * 1e9))
    if plan.cpu_only:
        fixed = plan.non_expert_read_per_token / cpu
    else:
        gpu = max(bw.gpu or 1000.0, 1.0) * 1e9
        fixed = plan.non_expert_read_per_token / gpu + b * plan.p_device / gpu
    return 1.0 / (expert_s + fixed + PER_LAYER_OVERHEAD_S * plan.n_layers)


def at_hit_rate(plan: Plan, hit_rate: float) -> Plan:
    """The plan with its host expert uses split between RAM and disk at another hit rate (e.g. one measured), to
    check the cost model apart from the routing guess."""
    host = 1.0 - plan.p_device
    h = min(max(hit_rate, 0.0), 1.0)
    return replace(plan, p_ram=host * h, p_disk=host * (1.0 - h))


def decode_breakdown(plan: Plan) -> dict[str, float]:
    """Expert bytes per decoded token by tier."""
    b = plan.bytes_per_token
    return {"device": b * plan.p_device, "ram": b * plan.p_ram, "disk": b * plan.p_disk}
