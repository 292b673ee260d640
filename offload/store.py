"""Expert byte tiers: RAM (resident, pinned under CUDA), disk (our own bounded RAM cache filled by large pread /
O_DIRECT reads, frequency eviction) and the device cache (experts kept on the GPU, ready to multiply).

Experts are never read through a page-cache mmap: a slot pool of fixed-size, page-aligned buffers is allocated
once (the RAM budget), and each expert's segments are read straight into its slot by a few I/O threads.
"""
from __future__ import annotations

import collections
import itertools
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from offload.cache import CacheCounters, CachePolicy, FrequencyPolicy
from offload.errors import ExpertReadError
from offload.expert_layout import ExpertEntry, ExpertLayout, MatrixFormat, cheap_to_decode, decode_matrix
from offload.experts_dense import swiglu
from offload.slot_layout import KernelTypes, kernel_types, repack_in_place

try:  # the compiled kernels place expert memory on NUMA nodes; without them the kernel's default policy applies
    from offload import kernels as _kernels
except ImportError:  # pragma: no cover
    _kernels = None  # type: ignore[assignment]

Key = tuple[int, int]  # (layer, expert)
ALIGN = 4096  # O_DIRECT needs file offset, length and buffer address aligned to the logical block size


def _align_down(n: int, a: int = ALIGN) -> int:
    return n - n % a


def _align_up(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class SlotPlan:
    """Where an expert's segments land in a slot: aligned read ranges and where each segment's data starts."""

    reads: tuple[tuple[int, int, int], ...]  # (slot offset, file offset, read length)
    data: tuple[tuple[int, int], ...]  # (slot offset of the segment's first byte, nbytes)
    size: int


def plan_slot(entry: ExpertEntry) -> SlotPlan:
    reads, data, pos = [], [], 0
    for seg in entry.segments:
        if seg.path is None:
            reads.append((pos, -1, seg.nbytes))
            data.append((pos, seg.nbytes))
            pos += _align_up(seg.nbytes)
            continue
        start = _align_down(seg.offset)
        length = _align_up(seg.offset + seg.nbytes) - start
        reads.append((pos, start, length))
        data.append((pos + seg.offset - start, seg.nbytes))
        pos += length
    return SlotPlan(tuple(reads), tuple(data), pos)


class FileReader:
    """Thread-safe positional reads; O_DIRECT when the file system allows it (bypasses the page cache)."""

    def __init__(self, direct: bool = True):
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._fds: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()

    def _fd(self, path: str) -> tuple[int, bool]:
        with self._lock:
            got = self._fds.get(path)
            if got is None:
                got = (-1, False)
                if self.direct:
                    try:
                        got = (os.open(path, os.O_RDONLY | os.O_DIRECT), True)  # type: ignore[attr-defined]
                    except OSError:
                        got = (-1, False)
                if got[0] < 0:
                    try:
                        got = (os.open(path, os.O_RDONLY), False)
                    except OSError as e:
                        raise ExpertReadError(f"{path}: cannot open expert file ({e.strerror})") from None
                self._fds[path] = got
            return got

    def _fallback(self, path: str, fd: int) -> int:
        with self._lock:
            cur = self._fds.get(path)
            if cur is not None and cur[0] == fd and cur[1]:
                os.close(fd)
                self._fds[path] = (os.open(path, os.O_RDONLY), False)
            return self._fds[path][0]

    def read_into(self, path: str, offset: int, buf: memoryview, need: int) -> None:
        """Fill buf from `offset`; at least `need` bytes must exist (the tail of an aligned read may pass EOF)."""
        fd, direct = self._fd(path)
        got = 0
        while got < len(buf):
            try:
                n = os.preadv(fd, [buf[got:]], offset + got)
            except OSError as e:
                if direct and e.errno == 22:  # EINVAL: this file or buffer cannot do O_DIRECT
                    fd, direct = self._fallback(path, fd), False
                    continue
                raise ExpertReadError(f"{path}: read failed at {offset + got} ({e.strerror})") from None
            if n <= 0:
                break
            got += n
        if got < need:
            raise ExpertReadError(f"{path}: truncated (expert bytes end past the end of the file)")
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, len(buf), os.POSIX_FADV_DONTNEED)  # keep the page cache out of it

    @property
    def direct_files(self) -> int:
        return sum(1 for _, d in self._fds.values() if d)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()


def alloc_aligned(nbytes: int, pin: bool = False) -> tuple[torch.Tensor, bool]:
    """A page-aligned uint8 CPU buffer (pinned if asked and possible); pages are not touched here. Unpinned buffers
    from 4 MiB up start on a huge page and are advised for huge pages (offload.kernels.advise_hugepages: the read loop
    streamed them 1.03x faster than torch.empty's 4 KiB pages on the Zen 4 VM of bench/RESULTS.md)."""
    raw = None
    pinned = False
    if pin and torch.cuda.is_available():
        try:
            raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
            pinned = True
        except RuntimeError:
            raw = None
    huge = raw is None and _kernels is not None and nbytes >= 2 * _kernels.HUGE_PAGE
    align = _kernels.HUGE_PAGE if huge else ALIGN  # type: ignore[union-attr]
    if raw is None:
        raw = torch.empty(nbytes + align, dtype=torch.uint8)
    start = (-raw.data_ptr()) % align
    buf = raw[start:start + nbytes]
    if huge:
        _kernels.advise_hugepages(buf)  # type: ignore[union-attr]
    return buf, pinned


class SlotPool:
    """n fixed-size page-aligned slots, in chunks of about 1 GiB (so no single huge allocation).

    numa: page-interleave the (not yet touched) slot memory across NUMA nodes; None decides from K2LOCAL_NUMA and
    the machine (offload.kernels.numa_interleave_wanted). Pinned memory is placed by the CUDA driver instead."""

    def __init__(self, n_slots: int, slot_bytes: int, pin: bool = False, chunk_bytes: int = 1 << 30,
                 numa: bool | None = None):
        self.n_slots = n_slots
        self.slot_bytes = _align_up(max(slot_bytes, 1))
        self.per_chunk = max(1, chunk_bytes // self.slot_bytes)
        self._chunks: list[torch.Tensor] = []
        self.pinned = pin
        self.numa_nodes = 0  # nodes the slot memory is interleaved over (0: left to the kernel's default policy)
        interleave = _kernels is not None and (_kernels.numa_interleave_wanted() if numa is None else numa)
        for start in range(0, n_slots, self.per_chunk):
            k = min(self.per_chunk, n_slots - start)
            buf, ok = alloc_aligned(k * self.slot_bytes, pin)
            self.pinned = self.pinned and ok
            if interleave and not ok:
                self.numa_nodes = _kernels.interleave_memory(buf)
            self._chunks.append(buf)
        self._np = [c.numpy() for c in self._chunks]

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.slot_bytes

    def tensor(self, slot: int) -> torch.Tensor:
        c, i = divmod(slot, self.per_chunk)
        return self._chunks[c][i * self.slot_bytes:(i + 1) * self.slot_bytes]

    def memview(self, slot: int, start: int, length: int) -> memoryview:
        c, i = divmod(slot, self.per_chunk)
        base = i * self.slot_bytes + start
        return memoryview(self._np[c][base:base + length])  # type: ignore[arg-type]


class _IOPool:
    """A few daemon threads running load jobs by priority (-1 = the other segments of an expert being read,
    0 = a layer waits on it, 1 = prefetch)."""

    def __init__(self, n_threads: int):
        self._q: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"k2-expert-io-{i}")
                         for i in range(max(1, n_threads))]
        for t in self._threads:
            t.start()

    def submit(self, prio: int, fn: Callable[[], None]) -> None:
        self._q.put((prio, next(self._seq), fn))

    def _run(self) -> None:
        while True:
            _, _, fn = self._q.get()
            if fn is None:
                return
            fn()

    def close(self, timeout: float = 5.0) -> None:
        for _ in self._threads:
            self._q.put((99, next(self._seq), None))
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)


class Lease:
    """A pinned expert in a RAM slot: the segment byte views stay valid until `release()`."""

    __slots__ = ("key", "slot", "views", "entry", "_store", "tier")

    def __init__(self, store: "ExpertStore", key: Key, slot: int, tier: str):
        self._store, self.key, self.slot, self.tier = store, key, slot, tier
        self.entry = store.layout.entry(*key)
        self.views = store.slot_views(slot, store.plan(key).data)

    def matrices(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """gate, up, down dequantized to `dtype` (on the CPU)."""
        if any(t is not None for t in self._store.kernel_types(self.entry.formats)):
            raise RuntimeError(f"expert {self.key} is held in the kernels' interleaved layout: no torch decode")
        return [decode_matrix(f, v, dtype) for f, v in self.entry.matrix_segments(self.views)]

    def release(self) -> None:
        if self._store is not None:
            self._store._release(self.slot)
            self._store = None  # type: ignore[assignment]


class _Request(Future):
    """A request for one expert: resolves to a Lease when `pin` (the caller reads the bytes), else to None."""

    def __init__(self, key: Key, pin: bool):
        super().__init__()
        self.key, self.pin = key, pin


class _Load:
    __slots__ = ("futures", "prefetch", "stale", "deferred")

    def __init__(self, prefetch: bool):
        self.futures: list[_Request] = []
        self.prefetch = prefetch  # no demand has joined it yet
        self.stale = False  # a prefetch whose layer has run without it: dropped unless started
        self.deferred = False  # a prefetch waiting for a free slot (resubmitted when one frees up)


class _Parts:
    """Segments of one expert read on several I/O threads: who finishes last completes the load."""

    def __init__(self, n: int):
        self._n, self._err = n, None
        self._lock = threading.Lock()

    def finish(self, err: BaseException | None) -> tuple[bool, BaseException | None]:
        """(this was the last part, the first error any part had)."""
        with self._lock:
            self._n -= 1
            if err is not None and self._err is None:
                self._err = err
            return self._n == 0, self._err


class _BusyClock:
    """Wall time during which at least one read is in progress (the disk tier's busy time)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0
        self._since = 0.0
        self.busy_s = 0.0

    def enter(self) -> None:
        with self._lock:
            if self._n == 0:
                self._since = time.perf_counter()
            self._n += 1

    def leave(self) -> None:
        with self._lock:
            self._n -= 1
            if self._n == 0:
                self.busy_s += time.perf_counter() - self._since

    def reset(self) -> None:
        with self._lock:
            self.busy_s = 0.0
            if self._n:
                self._since = time.perf_counter()


class ExpertStore:
    """Expert bytes in RAM slots. `resident` mode preloads every expert (the RAM tier); otherwise the slots are a
    cache over the disk (the disk tier): demand misses and prefetches read into a free or reclaimed slot.

    Disk tier: `n_slots` cache slots hold the experts the policy ranks hottest (frequency with aging, seeded by
    saved routing statistics); `staging` more slots take the reads that do not win a cache place (prefetches,
    and misses colder than every cached expert) and are reused least recently used first, so a one-off expert or
    a wrong guess never pushes a hot one out. An expert wins a cache place on demand only (a prefetch is staged
    until a layer asks for it), and a cached expert it displaces is demoted to staging, not dropped.
    """

    def __init__(self, layout: ExpertLayout, n_slots: int | None = None, pin: bool = False,
                 policy: CachePolicy | None = None, io_threads: int = 4, direct_io: bool = True,
                 keys: list[Key] | None = None, tier: str | None = None, staging: int = 0, repack: bool = False):
        """repack: when every expert is resident, rewrite the matrices the CPU kernels read faster interleaved
        (offload.slot_layout) as they are read; leases then serve the compiled kernels only."""
        self.layout = layout
        keys = list(keys) if keys is not None else layout.keys()
        self.keys = keys
        self._plans = {k: plan_slot(layout.entry(*k)) for k in layout.keys()}
        self._views: dict[tuple[int, tuple], tuple[torch.Tensor, ...]] = {}
        slot_bytes = max((self._plans[k].size for k in keys), default=ALIGN)
        self.all_resident = n_slots is None or n_slots >= len(keys)
        self.repack = bool(repack) and self.all_resident  # read once per expert: the rewrite is paid once
        self._ktypes: dict[tuple[MatrixFormat, ...], KernelTypes] = {}
        self.cache_slots = len(keys) if self.all_resident else max(1, int(n_slots or 1))
        self.staging_slots = 0 if self.all_resident else max(0, min(int(staging), len(keys) - self.cache_slots))
        n = self.cache_slots + self.staging_slots
        self.pool = SlotPool(n, slot_bytes, pin)
        self.policy: CachePolicy = policy or FrequencyPolicy()
        self.reader = FileReader(direct_io)
        self.counters = CacheCounters()
        self.busy = _BusyClock()
        self.tier = tier or ("ram" if self.all_resident else "disk")
        self._resident: dict[Key, int] = {}
        self._cached: set[Key] = set()  # resident keys holding a cache place (at most cache_slots)
        self._staged: collections.OrderedDict[Key, None] = collections.OrderedDict()  # the rest, LRU first
        self._by_slot: dict[int, Key] = {}
        self._refs = [0] * n
        self._free = list(range(n - 1, -1, -1))
        self._loading: dict[Key, _Load] = {}
        self._prefetched: set[Key] = set()
        self._deferred: collections.OrderedDict[Key, None] = collections.OrderedDict()
        self._protect: set[Key] = set()
        self._cv = threading.Condition()
        self._io = _IOPool(io_threads)
        self._closed = False

    # ------------------------------------------------------------------ info
    @property
    def n_slots(self) -> int:
        return self.pool.n_slots

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes

    def plan(self, key: Key) -> SlotPlan:
        return self._plans[key]

    def slot_views(self, slot: int, data: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, ...]:
        """Byte views of `slot` at the (offset, nbytes) ranges `data`: made once per slot and plan shape (experts of a
        layer share one), since a decode step leases ~8 experts per layer and slicing cost ~3 us a lease."""
        v = self._views.get((slot, data))
        if v is None:
            base = self.pool.tensor(slot)
            v = self._views[(slot, data)] = tuple(base[o:o + n] for o, n in data)
        return v

    def kernel_types(self, formats: tuple[MatrixFormat, ...]) -> KernelTypes:
        """Per matrix of an expert with these formats: the interleaved type its slot bytes are in, or None (gguf's)."""
        t = self._ktypes.get(formats)
        if t is None:
            t = self._ktypes[formats] = kernel_types(formats) if self.repack else (None,) * len(formats)
        return t

    def is_resident(self, key: Key) -> bool:
        with self._cv:
            return key in self._resident

    def resident_keys(self) -> list[Key]:
        with self._cv:
            return list(self._resident)

    def cached_keys(self) -> list[Key]:
        """The resident experts holding a cache place (not staged)."""
        with self._cv:
            return list(self._cached) if not self.all_resident else list(self._resident)

    def free_slots(self) -> int:
        with self._cv:
            return len(self._free)

    def protect(self, keys: Iterable[Key]) -> None:
        """Prefer not to evict these (the experts the current layer is about to use)."""
        with self._cv:
            self._protect = set(keys)

    def pinned_keys(self) -> list[Key]:
        """Experts someone holds a lease on right now."""
        with self._cv:
            return [k for k, s in self._resident.items() if self._refs[s] > 0]

    # ------------------------------------------------------------------ loading
    def preload(self, keys: Iterable[Key] | None = None, progress: Callable[[int], None] | None = None) -> None:
        """Read `keys` (default: all, for the RAM tier) with all I/O threads; blocks until done. On the disk tier
        (a pre-warm from routing statistics) at most the cache's size of them, each taking a cache place."""
        keys = list(keys if keys is not None else self.keys)
        if not self.all_resident:
            keys = keys[:self.cache_slots]
        futs = []
        for k in keys:
            f = self._request(k, prio=0, pin=False, count=False)
            if f is not None:
                futs.append(f)
        for f in futs:
            f.result()
            if progress:
                progress(self.layout.entry(*f.key).nbytes)

    def read_copy(self, key: Key) -> list[torch.Tensor]:
        """Read one expert into a fresh buffer outside the pool (to fill the device cache); its segment views."""
        plan = self._plans[key]
        buf, _ = alloc_aligned(plan.size)
        arr = buf.numpy()
        for (soff, foff, length), seg, (_, need) in zip(plan.reads, self.layout.entry(*key).segments, plan.data):
            if seg.path is None:
                seg.copy_into(memoryview(arr[soff:soff + need]))  # type: ignore[arg-type]
            else:
                self.reader.read_into(seg.path, foff, memoryview(arr[soff:soff + length]),  # type: ignore[arg-type]
                                      need + seg.offset - foff)
        return [buf[o:o + n] for o, n in plan.data]

    def _count_hit(self, key: Key) -> None:
        """A demand use of resident `key` (under the lock)."""
        self.counters.hits += 1
        self.counters.bytes_served += self.layout.entry(*key).nbytes
        if key in self._prefetched:
            self.counters.prefetch_hits += 1
            self.counters.miss_bytes += self.layout.entry(*key).nbytes
            self._prefetched.discard(key)
        if key in self._staged:
            self._staged.move_to_end(key)
            self._admit(key)

    def pin_resident(self, keys: Iterable[Key]) -> list[Lease]:
        """Leases on those of `keys` that are resident right now (counted as hits); never waits or reads."""
        keys = list(keys)
        for k in keys:
            self.policy.request(k)
        out = []
        with self._cv:
            for k in keys:
                slot = self._resident.get(k)
                if slot is None:
                    continue
                self._refs[slot] += 1
                self._count_hit(k)
                out.append(Lease(self, k, slot, self.tier))
        return out

    def fixed_views(self, keys: Sequence[Key]) -> list[tuple[torch.Tensor, ...]] | None:
        """The segment byte views of `keys` when every expert is resident for good (all_resident, all of them
        loaded): they never move, so a caller may keep them without leases. None otherwise."""
        if not self.all_resident:
            return None
        with self._cv:
            slots = [self._resident.get(k) for k in keys]
        if any(s is None for s in slots):
            return None
        return [self.slot_views(s, self.plan(k).data) for s, k in zip(slots, keys)]  # type: ignore[arg-type]

    def count_uses(self, keys: Iterable[Key]) -> None:
        """Count demand uses of resident experts read through fixed_views (hits, bytes served)."""
        with self._cv:
            for k in keys:
                self._count_hit(k)

    def lease(self, key: Key, counted: bool = False) -> Future:
        """A future Lease on `key` (already resolved on a hit); the caller must `release()` it.
        counted: the policy has already been told of this use (pin_resident was asked for it first)."""
        if not counted:
            self.policy.request(key)
        f = self._request(key, prio=0, pin=True, count=True)
        assert f is not None
        return f

    def prefetch(self, keys: Iterable[Key]) -> int:
        """Start reading likely-needed experts into staging slots (never displacing a cached expert, nor one in
        use); returns how many reads were started or queued."""
        n = 0
        for k in keys:
            if self._request(k, prio=1, pin=False, count=False, speculative=True) is not None:
                n += 1
        return n

    def retire_prefetches(self, layer: int, needed: Iterable[Key]) -> int:
        """`layer` is running with the experts `needed`: prefetches of its other experts were wrong guesses. Queued
        or waiting ones are dropped, and staged ones are the first slots reused. Returns how many."""
        need = set(needed)
        n = 0
        with self._cv:
            for k, load in list(self._loading.items()):
                if k[0] == layer and k not in need and load.prefetch and not load.futures[1:]:
                    load.stale = True
                    n += 1
                    if load.deferred:
                        self._deferred.pop(k, None)
                        self._finish_dropped(k)
            for k in [k for k in self._prefetched if k[0] == layer and k not in need]:
                self._prefetched.discard(k)
                if k in self._staged:
                    self._staged.move_to_end(k, last=False)
                    n += 1
        return n

    def _request(self, key: Key, prio: int, pin: bool, count: bool, speculative: bool = False) -> Future | None:
        fut = _Request(key, pin)
        with self._cv:
            if self._closed:
                raise RuntimeError("expert store is closed")
            slot = self._resident.get(key)
            if slot is not None:
                if speculative:
                    return None
                if pin:
                    self._refs[slot] += 1
                if count:
                    self._count_hit(key)
                fut.set_result(Lease(self, key, slot, self.tier) if pin else None)
                return fut
            load = self._loading.get(key)
            if load is not None:
                if speculative:
                    return None
                if count:
                    nb = self.layout.entry(*key).nbytes
                    self.counters.bytes_served += nb
                    self.counters.miss_bytes += nb
                    if load.prefetch:
                        self.counters.hits += 1
                        self.counters.prefetch_hits += 1
                    else:
                        self.counters.misses += 1
                load.prefetch = False
                load.stale = False
                load.futures.append(fut)
                if load.deferred:  # it was waiting for a slot as a prefetch: now a demand load
                    load.deferred = False
                    self._deferred.pop(key, None)
                    self._io.submit(0, lambda: self._load(key, False))
                return fut
            if speculative and not self._free and not self._reclaimable(speculative=True):
                return None
            if count:
                nb = self.layout.entry(*key).nbytes
                self.counters.misses += 1
                self.counters.bytes_served += nb
                self.counters.miss_bytes += nb
            if speculative:
                self.counters.prefetch_issued += 1
            load = _Load(prefetch=speculative)
            load.futures.append(fut)
            self._loading[key] = load
        self._io.submit(prio, lambda: self._load(key, speculative))
        return fut

    def _reclaimable(self, speculative: bool) -> Key | None:
        """The staged expert whose slot to reuse (least recently used, nobody holding it), under the lock."""
        for k in self._staged:
            if self._refs[self._resident[k]] == 0 and k not in self._protect:
                if speculative and k in self._prefetched and k[0] not in {p[0] for p in self._protect}:
                    continue  # an unused guess for a layer still to come: keep it
                return k
        return None

    def _drop(self, key: Key) -> int:
        slot = self._resident.pop(key)
        del self._by_slot[slot]
        self._cached.discard(key)
        self._staged.pop(key, None)
        self._prefetched.discard(key)
        self.counters.evictions += 1
        return slot

    def _admit(self, key: Key) -> None:
        """Give resident `key` a cache place if one is free or it is hotter than the coldest cached expert nobody
        holds (which is demoted to staging); otherwise it stays staged. Under the lock."""
        if key in self._cached:
            return
        if len(self._cached) >= self.cache_slots:
            cands = [k for k in self._cached if self._refs[self._resident[k]] == 0 and k not in self._protect]
            victim = self.policy.victim(cands)
            if victim is None or self.policy.score(victim) >= self.policy.score(key):
                self._staged[key] = None
                return
            self._cached.discard(victim)
            self._staged[victim] = None
            self._staged.move_to_end(victim, last=False)  # cold: the first reused
        self._staged.pop(key, None)
        self._cached.add(key)

    def _take_slot(self, key: Key, speculative: bool) -> int | None:
        """A free slot, else a reclaimed staged one, else (demand loads only) the coldest cached expert's; demand
        loads wait for one."""
        with self._cv:
            while True:
                if self._free:
                    return self._free.pop()
                k = self._reclaimable(speculative)
                if k is not None:
                    return self._drop(k)
                if speculative or self._closed:
                    return None
                unpinned = [k for k, s in self._resident.items() if self._refs[s] == 0]
                cands = [k for k in unpinned if k not in self._protect] or unpinned
                victim = self.policy.victim(cands)
                if victim is not None:
                    return self._drop(victim)
                self._cv.wait()

    def _finish_dropped(self, key: Key) -> None:
        """A load that will not happen (a stale or slotless prefetch): resolve its waiters (under the lock)."""
        load = self._loading.pop(key)
        for f in load.futures:
            if self._closed:
                f.set_exception(RuntimeError("expert store is closed"))
            else:
                f.set_result(None)

    def _load(self, key: Key, speculative: bool) -> None:
        slot = None
        try:
            with self._cv:
                load = self._loading.get(key)
                if load is None or (load.stale and load.prefetch):
                    if load is not None:
                        self._finish_dropped(key)
                    return
                speculative = speculative and load.prefetch
            slot = self._take_slot(key, speculative)
            if slot is None:
                with self._cv:
                    load = self._loading[key]
                    if not self._closed and not load.prefetch:  # a demand joined it: load it as one
                        self._io.submit(0, lambda: self._load(key, False))
                    elif not self._closed and not load.stale:  # wait for a slot to free up
                        load.deferred = True
                        self._deferred[key] = None
                    else:
                        self._finish_dropped(key)
                return
            parts = self._read_parts(key, slot)
            done = _Parts(len(parts))
            for part in parts[1:]:  # the other segments on other I/O threads now: more reads in flight
                self._io.submit(-1, lambda part=part: self._run_part(key, slot, part, done))
            self._run_part(key, slot, parts[0], done)
        except BaseException as e:  # noqa: BLE001 (delivered to whoever waits)
            self._fail(key, slot, e)

    def _read_parts(self, key: Key, slot: int) -> list[Callable[[], None]]:
        """One closure per segment of `key`, filling its place in `slot`."""
        entry = self.layout.entry(*key)
        out: list[Callable[[], None]] = []
        for (soff, foff, length), seg, (_, need) in zip(self._plans[key].reads, entry.segments,
                                                        self._plans[key].data):
            if seg.path is None:
                out.append(lambda seg=seg, soff=soff, need=need: seg.copy_into(self.pool.memview(slot, soff, need)))
            else:
                out.append(lambda seg=seg, soff=soff, foff=foff, length=length, need=need: self.reader.read_into(
                    seg.path, foff, self.pool.memview(slot, soff, length), need + (seg.offset - foff)))
        ktypes = self.kernel_types(entry.formats)
        if any(t is not None for t in ktypes):  # ggml only: segment i is matrix i
            views = self.slot_views(slot, self._plans[key].data)

            def then_repack(read: Callable[[], None], fmt: MatrixFormat, view: torch.Tensor) -> Callable[[], None]:
                return lambda: (read(), repack_in_place(fmt, view))  # type: ignore[func-returns-value]
            out = [then_repack(read, f, v) if t is not None else read
                   for read, f, v, t in zip(out, entry.formats, views, ktypes)]
        return out

    def _run_part(self, key: Key, slot: int, part: Callable[[], None], done: "_Parts") -> None:
        err = None
        self.busy.enter()
        try:
            part()
        except BaseException as e:  # noqa: BLE001
            err = e
        finally:
            self.busy.leave()
        last, first_err = done.finish(err)
        if not last:
            return
        if first_err is not None:
            self._fail(key, slot, first_err)
            return
        try:
            self._complete(key, slot)
        except BaseException as e:  # noqa: BLE001
            self._fail(key, slot, e)

    def _complete(self, key: Key, slot: int) -> None:
        """Every segment of `key` is in `slot`: make it resident and hand out the leases waiting for it."""
        with self._cv:
            load = self._loading.pop(key)
            self._resident[key] = slot
            self._by_slot[slot] = key
            self.counters.bytes_read += self.layout.entry(*key).nbytes
            if load.prefetch:
                self._prefetched.add(key)
                self._staged[key] = None
            else:
                self._admit(key)
            leases = []
            for f in load.futures:
                if f.pin:
                    self._refs[slot] += 1
                    leases.append((f, Lease(self, key, slot, self.tier)))
                else:
                    leases.append((f, None))
            self._cv.notify_all()
        for f, lease in leases:
            f.set_result(lease)

    def _fail(self, key: Key, slot: int | None, e: BaseException) -> None:
        with self._cv:
            load = self._loading.pop(key, None)
            if slot is not None and self._by_slot.get(slot) != key:
                self._free.append(slot)
            self._cv.notify_all()
        for f in (load.futures if load else []):
            if not f.done():
                f.set_exception(e)

    def _release(self, slot: int) -> None:
        with self._cv:
            self._refs[slot] -= 1
            if self._refs[slot] == 0:
                self._cv.notify_all()
                if self._deferred:  # a prefetch waiting for a slot may take this one
                    k, _ = self._deferred.popitem(last=False)
                    load = self._loading.get(k)
                    if load is not None:
                        load.deferred = False
                        self._io.submit(1, lambda: self._load(k, True))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._io.close()
        self.reader.close()


# ---------------------------------------------------------------------------------------------- device tier
def _triton_q():
    """offload.kernels.triton_q, or None where it cannot be imported (a partial checkout)."""
    try:  # deferred: the Triton kernels (and triton itself) load only when a device cache decides on them
        from offload.kernels import triton_q  # noqa: PLC0415

        return triton_q
    except ImportError:  # pragma: no cover
        return None


def fused_on_device(entry: ExpertEntry, device: torch.device) -> bool:
    """Whether the device cache keeps this expert as its raw GGUF bytes and computes it with the fused Triton
    dequant-matmul kernels: every matrix is a ggml type they support and they are enabled for `device`
    (K2LOCAL_TRITON; default on CUDA when triton imports; on the CPU only under TRITON_INTERPRET=1, for tests)."""
    if not all(f.kind == "ggml" and f.qtype is not None for f in entry.formats):
        return False
    tq = _triton_q()
    return tq is not None and all(tq.supported(f.qtype) for f in entry.formats) and tq.enabled(device)


def fused_swiglu(x: torch.Tensor, entry: ExpertEntry, views: list[torch.Tensor],
                 gate_up: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(x Wg^T) * (x Wu^T) @ Wd^T with the fused kernels on the expert's byte views (on x's device).
    gate_up: the gate rows' bytes followed by the up rows' (same type): one launch for both, and the down
    kernel applies SiLU(g) * u as it reads them."""
    tq = _triton_q()
    assert tq is not None
    (fg, (g,)), (fu, (u,)), (fd, (d,)) = entry.matrix_segments(views)
    if gate_up is not None:
        return tq.swiglu_qmatmul_gpu(tq.qmatmul_gpu(x, gate_up, fg.qtype, fg.cols), d, fd.qtype, fd.cols)
    h = F.silu(tq.qmatmul_gpu(x, g, fg.qtype, fg.cols)) * tq.qmatmul_gpu(x, u, fu.qtype, fu.cols)
    return tq.qmatmul_gpu(h, d, fd.qtype, fd.cols)


def _gate_up_fusable(entry: ExpertEntry) -> bool:
    g, u, d = entry.formats
    return g.qtype == u.qtype and g.cols == u.cols and g.rows == u.rows == d.cols


def fused_or_dense(x: torch.Tensor, entry: ExpertEntry, views: list[torch.Tensor], dtype: torch.dtype,
                   gate_up: torch.Tensor | None = None) -> torch.Tensor:
    """fused_swiglu; if the kernels fail (say they do not compile for this GPU), warn once, turn them off for the
    process, and compute from matrices dequantized per use instead (same bytes, so same memory)."""
    tq = _triton_q()
    if tq is not None and tq.available(x.device):
        try:
            return fused_swiglu(x, entry, views, gate_up)
        except Exception as e:  # noqa: BLE001 (never crash a run over an optional fast path)
            tq.disable(f"{type(e).__name__}: {e}")
    return swiglu(x, *(decode_matrix(f, vs, dtype) for f, vs in entry.matrix_segments(views)))


def device_expert_bytes(entry: ExpertEntry, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes one expert takes in the device cache: raw bytes if the device computes on them (FP8/float casts on
    CUDA, or ggml types through the fused kernels), else dequantized in `dtype`."""
    if device.type == "cuda" and all(cheap_to_decode(f) for f in entry.formats):
        return entry.nbytes
    if fused_on_device(entry, device):
        return entry.nbytes
    return sum(f.rows * f.cols for f in entry.formats) * torch.tensor([], dtype=dtype).element_size()


class DeviceCache:
    """Experts resident on the compute device (the GPU cache tier), chosen from routing statistics.

    On CUDA, FP8/BF16 experts are kept as their raw bytes and dequantized per use on the GPU (one cheap pass).
    ggml block formats are kept as raw bytes too when the fused Triton kernels can compute on them
    (`fused_on_device`; about 3.5x less memory than bf16 at 4.5 bits/weight); otherwise (and on the CPU device,
    used to test this tier without a GPU, unless the Triton interpreter is on) they are kept dequantized in the
    compute dtype, since per-use block decoding with torch ops costs many kernel launches per token.
    """

    def __init__(self, layout: ExpertLayout, device: torch.device, dtype: torch.dtype):
        self.layout, self.device, self.dtype = layout, device, dtype
        self._raw: dict[Key, list[torch.Tensor]] = {}
        self._dense: dict[Key, list[torch.Tensor]] = {}
        self._fused: set[Key] = set()  # raw ggml bytes computed by the fused kernels
        self._gate_up: dict[Key, torch.Tensor] = {}  # their gate + up bytes in one buffer (_raw views into it)
        self.counters = CacheCounters()
        self.nbytes = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._raw or key in self._dense

    def __len__(self) -> int:
        return len(self._raw) + len(self._dense)

    def keys(self) -> list[Key]:
        return list(self._raw) + list(self._dense)

    @property
    def fused_experts(self) -> int:
        """How many cached experts are computed by the fused kernels."""
        return len(self._fused)

    def add(self, key: Key, views: list[torch.Tensor]) -> None:
        """Copy one expert in from its CPU byte views (a Lease's views)."""
        entry = self.layout.entry(*key)
        if fused_on_device(entry, self.device):
            if _gate_up_fusable(entry):  # gate and up rows in one buffer: one kernel launch for both
                gu = torch.cat([views[0].reshape(-1), views[1].reshape(-1)]).to(self.device)
                self._gate_up[key] = gu
                n_g = views[0].numel()
                self._raw[key] = [gu[:n_g], gu[n_g:], views[2].to(self.device).contiguous()]
            else:
                self._raw[key] = [v.to(self.device).contiguous() for v in views]
            self._fused.add(key)
            self.nbytes += entry.nbytes
        elif self.device.type == "cuda" and all(cheap_to_decode(f) for f in entry.formats):
            self._raw[key] = [v.to(self.device) for v in views]
            self.nbytes += entry.nbytes
        else:
            mats = [decode_matrix(f, vs, self.dtype).to(self.device) for f, vs in entry.matrix_segments(views)]
            self._dense[key] = mats
            self.nbytes += sum(m.numel() * m.element_size() for m in mats)
        self.counters.bytes_read += entry.nbytes

    def remove(self, key: Key) -> None:
        entry = self.layout.entry(*key)
        self._fused.discard(key)
        self._gate_up.pop(key, None)
        if key in self._raw:
            del self._raw[key]
            self.nbytes -= entry.nbytes
        elif key in self._dense:
            mats = self._dense.pop(key)
            self.nbytes -= sum(m.numel() * m.element_size() for m in mats)

    def matrices(self, key: Key) -> list[torch.Tensor]:
        """gate, up, down on the device, in the compute dtype (dequantized per use for raw entries)."""
        dense = self._dense.get(key)
        if dense is not None:
            return dense
        entry = self.layout.entry(*key)
        return [decode_matrix(f, vs, self.dtype) for f, vs in entry.matrix_segments(self._raw[key])]

    def compute(self, key: Key, x: torch.Tensor) -> torch.Tensor:
        """The expert's unweighted output SiLU(x Wg^T) * (x Wu^T) @ Wd^T for the rows x (on the device)."""
        if key in self._fused:
            return fused_or_dense(x, self.layout.entry(*key), self._raw[key], self.dtype, self._gate_up.get(key))
        return swiglu(x, *self.matrices(key))
