"""Measuring the machine for the planner: memory sizes, and RAM, disk, CPU-expert and GPU bandwidths.

Each measurement takes well under a second; `measure_bandwidths` runs them all the way the tiers will read.
"""
from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass

import psutil
import torch

from offload.executor import OffloadExperts
from offload.expert_layout import ExpertLayout
from offload.options import OffloadOptions
from offload.planner import MiB, Bandwidths, Hardware
from offload.store import ALIGN, ExpertStore, FileReader, alloc_aligned, plan_slot

try:  # the expert kernels' own streaming loop measures RAM the way they read it; torch otherwise
    from offload import kernels as _kernels
except ImportError:  # pragma: no cover (kernels are part of the project; tolerate a partial checkout)
    _kernels = None  # type: ignore[assignment]


def cgroup_memory(proc_root: str = "/proc/self", fs_root: str = "/sys/fs/cgroup") -> tuple[int, int] | None:
    """(limit, usage) in bytes of the memory cgroup this process runs in (v2 memory.max, v1
    memory.limit_in_bytes; usage less its inactive page cache), or None when there is no limit (or no cgroup
    file system to read)."""
    try:
        lines = open(f"{proc_root}/cgroup").read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        v2 = parts[0] == "0" and parts[1] == ""
        if not v2 and "memory" not in parts[1].split(","):
            continue
        base = os.path.join(fs_root, "" if v2 else "memory", parts[2].lstrip("/"))
        limit_f, usage_f = ("memory.max", "memory.current") if v2 else ("memory.limit_in_bytes",
                                                                          "memory.usage_in_bytes")
        try:
            raw = open(os.path.join(base, limit_f)).read().strip()
            if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:  # v1 writes "no limit" as ~2^63
                continue
            usage = int(open(os.path.join(base, usage_f)).read().strip())
        except (OSError, ValueError):
            continue
        usage -= _reclaimable(os.path.join(base, "memory.stat"), "inactive_file" if v2 else "total_inactive_file")
        return int(raw), usage
    return None


def _reclaimable(stat_path: str, key: str) -> int:
    """Page cache the cgroup's usage counts that the kernel would drop before failing an allocation."""
    try:
        for line in open(stat_path):
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def probe_hardware(device: torch.device | None = None) -> Hardware:
    """Memory sizes (RAM as the process may use it: a cgroup memory limit, e.g. a container's, caps both figures),
    CPU count and, with CUDA, the GPU's."""
    vm = psutil.virtual_memory()
    hw = Hardware(vm.total, vm.available, cpus=os.cpu_count() or 1)
    cg = cgroup_memory()
    if cg is not None:
        limit, usage = cg
        hw.ram_total, hw.ram_available = min(hw.ram_total, limit), max(0, min(hw.ram_available, limit - usage))
        hw.ram_limit = limit
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        dev = device if device is not None and device.index is not None else torch.device("cuda", 0)
        free, total = torch.cuda.mem_get_info(dev)
        hw.vram_free, hw.vram_total, hw.gpu_name = free, total, torch.cuda.get_device_name(dev)
    return hw


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
    if _kernels is not None and _kernels.available():
        bw = _kernels.read_bandwidth(nbytes=nbytes, reps=3)
        if bw > 0:
            return bw
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
                elif seg.fill is not None:  # read and repacked by the application: timed as the tier sees it
                    seg.fill(memoryview(arr[soff:soff + need]))  # type: ignore[arg-type]
                    total += need
            if total >= max_bytes or time.perf_counter() - t0 > max_s:
                break
        direct = reader.direct_files > 0
    finally:
        reader.close()
    return total / max(time.perf_counter() - t0, 1e-9) / 1e9, direct


@dataclass(frozen=True)
class RawDisk:
    """Raw O_DIRECT read bandwidth of the expert files at the disk tier's read size (GB/s)."""

    parallel: float  # the best of the depths above one (the device's limit with several reads in flight)
    one_stream: float  # one read at a time
    in_flight: int  # the depth that gave `parallel`
    read_bytes: int
    direct: bool  # False: the file system refused O_DIRECT (the page cache may have served reads)
    dropped_caches: bool  # the page cache was dropped first (needs root and a writable /proc/sys/vm)
    by_depth: tuple[tuple[int, float], ...] = ()  # (reads in flight, GB/s) for every depth measured

    @property
    def best(self) -> float:
        """The device's limit: the best figure at any depth (one at a time included)."""
        return max(self.parallel, self.one_stream)


def drop_page_cache() -> bool:
    """Ask the kernel to drop clean page-cache pages (root only); whether it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _raw_read_gbs(paths: list[str], read_bytes: int, in_flight: int, max_bytes: int, max_s: float,
                  seed: int) -> tuple[float, bool]:
    """GB/s of aligned O_DIRECT preads of `read_bytes` at random offsets of `paths`, `in_flight` threads."""
    sizes = [os.path.getsize(p) for p in paths]
    spans = [(p, n) for p, n in zip(paths, sizes) if n >= read_bytes + ALIGN]
    if not spans:
        return 0.0, False
    reader = FileReader(direct=True)
    rng = random.Random(seed)
    jobs = []
    for _ in range(max(in_flight, max_bytes // read_bytes)):
        p, n = spans[rng.randrange(len(spans))]
        jobs.append((p, rng.randrange(0, (n - read_bytes) // ALIGN) * ALIGN))
    it = iter(jobs)
    lock = threading.Lock()
    done = [0]
    t_end = time.perf_counter() + max_s

    def worker() -> None:
        buf, _ = alloc_aligned(read_bytes)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]
        while time.perf_counter() < t_end:
            with lock:
                job = next(it, None)
            if job is None:
                return
            reader.read_into(job[0], job[1], view, read_bytes)
            with lock:
                done[0] += read_bytes

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        direct = reader.direct_files > 0
    finally:
        reader.close()
    return done[0] / max(time.perf_counter() - t0, 1e-9) / 1e9, direct


def measure_raw_disk(layout: ExpertLayout, in_flight: int = 4, max_bytes: int = 512 * MiB, max_s: float = 1.5
                     ) -> RawDisk | None:
    """The device's own limit for the disk tier: O_DIRECT reads of one expert matrix's size at random offsets of
    the expert files (not read before in this order, so no cache of ours or the kernel's serves them), one at a
    time and at 2, 4, ... up to `in_flight` at a time; the best depth above one is the parallel figure (a virtual
    disk measured here gave less with 8 in flight than with 4 or 1). None when the experts are not plain file
    bytes."""
    paths = layout.files()
    if not paths or not layout.keys():
        return None
    reads = [length for k in layout.keys()[:4] for (_, foff, length) in plan_slot(layout.entry(*k)).reads
             if foff >= 0]
    if not reads:
        return None
    read_bytes = max(reads)
    dropped = drop_page_cache()
    depths = [1] + [d for d in (2, 4, 8, 16) if d < in_flight] + ([in_flight] if in_flight > 1 else [])
    share = max_s / len(depths)
    by_depth, direct = [], True
    for i, d in enumerate(depths):
        gbs, ok = _raw_read_gbs(paths, read_bytes, d, max_bytes // len(depths), share, seed=1 + i)
        by_depth.append((d, gbs))
        direct = direct and ok
    one = by_depth[0][1]
    par_depth, par = max(by_depth[1:], key=lambda x: x[1]) if len(by_depth) > 1 else by_depth[0]
    return RawDisk(par, one, par_depth, read_bytes, direct, dropped, tuple(by_depth))


def measure_cpu_expert(layout: ExpertLayout, dtype: torch.dtype = torch.float32, max_s: float = 1.0) -> float:
    """Weight GB/s of the CPU expert path for one decode token (k experts of the first MoE layer, resident)."""
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


def measure_bandwidths(layout: ExpertLayout, device: torch.device, dtype: torch.dtype = torch.float32,
                       io_threads: int = OffloadOptions.io_threads) -> Bandwidths:
    """Quick measurements (a few seconds): RAM, disk (as the disk tier reads, and raw with `io_threads` reads in
    flight), CPU expert path, GPU."""
    ram = measure_ram_bandwidth()
    disk, direct = measure_disk_bandwidth(layout)
    cpu_dtype = dtype if device.type == "cpu" else torch.float32
    try:
        cpu = measure_cpu_expert(layout, cpu_dtype)
    except Exception:  # noqa: BLE001 (a missing codec should not stop the plan)
        cpu = None
    gpu, h2d = measure_gpu(device)
    raw = measure_raw_disk(layout, in_flight=io_threads)
    return Bandwidths(ram=ram, disk=disk, cpu_expert=cpu, gpu=gpu, h2d=h2d, disk_direct=direct,
                      disk_parallel=raw.parallel if raw else None, disk_one_stream=raw.one_stream if raw else None)
