"""The hybrid MoE executor: an `ExpertBackend` that computes each routed expert where its bytes are.

Per MoE layer: experts in the device cache run on the compute device (asynchronously on CUDA); the others are
leased from the RAM store (resident or disk cache) and computed on the CPU (offload.kernels for ggml types,
torch dequantize + matmul otherwise) while misses stream in; prefill batches of at least
`gpu_prefill_min_tokens` tokens ship host experts to the GPU instead. On the GPU, ggml-quantized experts are
computed on their raw bytes by the fused Triton kernels (offload.kernels.triton_q) when those are enabled.
Meanwhile a prefetch thread predicts the next MoE layer's experts from the current hidden state (its router
applied early) and starts reading them.
Contributions are summed in ascending expert order, so the result never depends on which tier served what.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from offload.cache import CacheCounters
from offload.expert_layout import ExpertLayout, decode_matrix, decodes_on_gpu
from offload.experts_dense import swiglu
from offload.planner import Plan
from offload.routing_stats import RoutingStats
from offload.store import DeviceCache, ExpertStore, Key, Lease, fused_on_device, fused_or_dense
from offload.threads import decode_step, torch_threads

try:
    from offload import kernels as _kernels
except ImportError:  # pragma: no cover (kernels are part of the project; tolerate a partial checkout)
    _kernels = None  # type: ignore[assignment]


class RouterPredictor:
    """Guesses a layer's experts from an earlier hidden state by applying that layer's router to it."""

    def __init__(self, routers: dict[int, tuple[torch.Tensor, torch.Tensor | None]], scoring: str = "sigmoid"):
        self.routers, self.scoring = routers, scoring

    def predict(self, layer: int, x: torch.Tensor, k: int) -> list[int]:
        r = self.routers.get(layer)
        if r is None:
            return []
        weight, bias = r
        if x.shape[0] > 32:  # a sample of a long prefill is enough to rank experts
            x = x[torch.linspace(0, x.shape[0] - 1, 32).long()]
        logits = F.linear(x.to(weight.device, torch.float32), weight.float())
        s = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(-1)
        if bias is not None:
            s = s + bias.float()
        kk = min(k, s.shape[1])
        top = s.topk(kk, dim=-1)
        # rank by how many tokens want the expert, then by score
        score: dict[int, float] = collections.defaultdict(float)
        for row_i, row_v in zip(top.indices.tolist(), top.values.tolist()):
            for e, v in zip(row_i, row_v):
                score[e] += 1.0 + 1e-3 * v
        return sorted(score, key=lambda e: -score[e])


@dataclass
class PredictionCounters:
    """How well the next layer's router, applied to the current hidden state, guessed a decode step's experts."""

    predicted: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.predicted if self.predicted else 0.0


def _release_when_done(f: Future) -> None:
    if f.exception() is None and f.result() is not None:
        f.result().release()


class OffloadExperts:
    """ExpertBackend over tiers: device cache, RAM store (all resident, or a bounded cache over the disk)."""

    def __init__(self, layout: ExpertLayout, store: ExpertStore, device: torch.device | str,
                 dtype: torch.dtype, device_cache: DeviceCache | None = None,
                 routing: RoutingStats | None = None, predictor: RouterPredictor | None = None,
                 top_k: int = 8, gpu_prefill_min_tokens: int = 64, lookahead: int = 4,
                 prefetch: bool = True, use_kernels: bool = True, stats_path: str | None = None,
                 plan: Plan | None = None):
        self.layout, self.store = layout, store
        self.plan = plan  # the placement this backend was built for (None when built by hand)
        self.device = torch.device(device)
        self.dtype = dtype
        # host experts compute in the model's dtype on a CPU-only run (same numbers as the in-memory path)
        self.cpu_dtype = dtype if self.device.type == "cpu" else torch.float32
        self.device_cache = device_cache
        n_layers = max(layout.moe_layers) + 1 if layout.moe_layers else 0
        self.routing = routing or RoutingStats(n_layers, layout.n_experts)
        self.predictor = predictor
        self.top_k = top_k
        self.gpu_prefill_min_tokens = gpu_prefill_min_tokens
        self.lookahead = lookahead
        self.stats_path = stats_path
        self.use_kernels = use_kernels and _kernels is not None and _kernels.available()
        self._qtypes: dict[int, tuple[int, int, int] | None] = {}
        self._bound: dict[int, Any] = {}  # layer -> its experts bound for one-token calls (_one_token_layer)
        self._next_layer = {a: b for a, b in zip(layout.moe_layers, layout.moe_layers[1:])}
        self._first_layer = layout.moe_layers[0] if layout.moe_layers else -1
        self.shipped = CacheCounters()  # host experts shipped to the GPU for big batches
        self.prediction = PredictionCounters()
        self._guesses: dict[int, set[int]] = {}  # layer -> experts the prefetch guessed for its next decode step
        self.tokens = 0
        self.timers: dict[str, float] = collections.defaultdict(float)
        self._prefetch_q: queue.Queue | None = None
        self._prefetch_thread: threading.Thread | None = None
        if prefetch and predictor is not None and not store.all_resident:
            self._prefetch_q = queue.Queue(maxsize=2)
            self._prefetch_thread = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                     name="k2-expert-prefetch")
            self._prefetch_thread.start()
        self._worker: ThreadPoolExecutor | None = None
        self._copy_stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self._closed = False

    # ------------------------------------------------------------------ ExpertBackend
    @torch.inference_mode()
    def forward(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """y[t] = sum_k w[t,k] * Expert_{idx[t,k]}(x[t]); x [T, H] on the compute device."""
        with torch_threads(1 if decode_step(x.shape[0]) else 0):  # the kernels' pool does the work
            return self._forward(layer, x, idx, w)

    def _forward(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        T = x.shape[0]
        bound = self._one_token_layer(layer, x.shape[1]) if T == 1 else None
        if bound is not None:
            return self._forward_one(layer, bound, x, idx, w, t0)
        if layer == self._first_layer:
            self.tokens += T
        idx_cpu = idx.detach().to("cpu", torch.long)
        self.routing.record(layer, idx_cpu)
        experts = torch.unique(idx_cpu).tolist()
        groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        dev_groups: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def group(e: int, on_device: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
            """(tokens, slots) routed to expert e, on the CPU or the compute device (computed once)."""
            if e not in groups:
                groups[e] = (idx_cpu == e).nonzero(as_tuple=True)
            if not on_device or self.device.type == "cpu":
                return groups[e]
            if e not in dev_groups:
                dev_groups[e] = tuple(t.to(self.device, non_blocking=True) for t in groups[e])  # type: ignore
            return dev_groups[e]
        outs: dict[int, torch.Tensor] = {}
        y_host: torch.Tensor | None = None
        host: list[Key] = []
        for e in experts:
            key = (layer, e)
            if self.device_cache is not None and key in self.device_cache:
                self.device_cache.counters.hits += 1
                self.device_cache.counters.bytes_served += self.layout.entry(*key).nbytes
                outs[e] = self.device_cache.compute(key, x[group(e)[0]])
            else:
                host.append(key)
        if self.device_cache is not None:
            self.device_cache.counters.misses += len(host)
        if self._prefetch_q is not None:
            self.store.retire_prefetches(layer, host)
            guess = self._guesses.pop(layer, None)
            if guess is not None and T == 1:  # the router-of-the-next-layer guess, against what was routed
                self.prediction.predicted += len(guess)
                self.prediction.correct += len(guess & set(experts))
        ship = self.device.type == "cuda" and T >= self.gpu_prefill_min_tokens and not self.store.repack \
            and self._decodable_on_device(host)
        x_host = None if ship else x.detach().to("cpu", self.cpu_dtype)
        if self._prefetch_q is not None and layer in self._next_layer:
            try:
                self._prefetch_q.put_nowait((self._next_layer[layer], x_host if x_host is not None else x.detach()))
            except queue.Full:
                pass
        if host:
            self.store.protect(host)
            qtypes = None if ship else self._layer_qtypes(layer)
            if ship:
                self._run_on_device(host, x, group, outs)
            elif qtypes is not None:
                assert x_host is not None
                y_host = self._kernel_layer(host, x_host, idx_cpu, w, qtypes)
            else:
                assert x_host is not None
                for key, lease in self._stream(host):
                    t1 = time.perf_counter()
                    e = key[1]
                    out = self._cpu_expert(lease, x_host[group(e, on_device=False)[0]])
                    outs[e] = out.to(self.device, self.dtype, non_blocking=True) if self.device.type != "cpu" \
                        else out.to(self.dtype)
                    self.timers["cpu_compute_s"] += time.perf_counter() - t1
            self.store.protect(())
        y = y_host.to(self.device, self.dtype) if y_host is not None else torch.zeros_like(x)
        for e in sorted(outs):  # fixed order: the sum does not depend on which tier served what
            tok, slot = group(e)
            y.index_add_(0, tok, outs[e] * w[tok, slot, None])
        self.timers["forward_s"] += time.perf_counter() - t0
        return y

    def _one_token_layer(self, layer: int, hidden: int) -> Any:
        """The layer's experts bound once for one-token kernel calls (offload.kernels.MoELayer) when they all sit in
        RAM for good and the CPU computes them (the RAM tier on a CPU-only run), else None: then every call goes
        the general way (leases, tiers, device cache)."""
        if layer in self._bound:
            return self._bound[layer]
        bound = None
        qtypes = self._layer_qtypes(layer)
        if self.device.type == "cpu" and self.device_cache is None and self._prefetch_q is None and qtypes:
            keys = [(layer, e) for e in range(self.layout.n_experts)]
            views = self.store.fixed_views(keys)
            if views is None:
                return None  # not loaded yet: ask again next time
            assert _kernels is not None
            bound = _kernels.MoELayer(views, qtypes, hidden)
        self._bound[layer] = bound
        return bound

    def _forward_one(self, layer: int, bound: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                     t0: float) -> torch.Tensor:
        """One token through a bound layer: the same rows and weighted sum as _kernel_layer, without leases."""
        idx_cpu = idx.detach().to("cpu", torch.long)
        if layer == self._first_layer:
            self.tokens += 1
        self.routing.record(layer, idx_cpu)
        ids = idx_cpu.view(-1).numpy().astype(np.int32)
        self.store.count_uses([(layer, int(e)) for e in ids])
        K = ids.shape[0]
        rows = torch.zeros(K, x.shape[1], dtype=torch.float32)
        t1 = time.perf_counter()
        bound.rows(x.detach().reshape(-1).to(torch.float32).contiguous(), ids, rows)
        self.timers["cpu_compute_s"] += time.perf_counter() - t1
        wf = w.detach().to("cpu", torch.float32)
        y = torch.bmm(wf.view(1, 1, K), rows.view(1, K, -1)).view(1, -1).to(self.dtype)
        self.timers["forward_s"] += time.perf_counter() - t0
        return y

    def begin(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> Future:
        """Start `forward` on a worker thread (so the caller can run the shared expert meanwhile); .result()."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="k2-moe")
        return self._worker.submit(self.forward, layer, x, idx, w)

    # ------------------------------------------------------------------ host experts
    def _stream(self, keys: list[Key]) -> Iterator[tuple[Key, Lease]]:
        """Leases in an order that overlaps I/O with compute: experts resident now first, while up to `lookahead`
        misses load in the background; each lease is released when the consumer asks for the next."""
        hits = self.store.pin_resident(keys)
        got = {lease.key for lease in hits}
        rest = self._pipeline([k for k in keys if k not in got])
        for lease in hits:
            try:
                yield lease.key, lease
            finally:
                lease.release()
        yield from rest

    def _pipeline(self, misses: list[Key]) -> Iterator[tuple[Key, Lease]]:
        """Starts reading the first `lookahead` misses now; the returned generator yields them as they arrive
        (releasing each lease when the next is asked for) and keeps `lookahead` reads in flight."""
        store = self.store
        depth = max(0, min(self.lookahead, store.n_slots - 1))
        pending: collections.deque[tuple[Key, Future]] = collections.deque()
        mi = 0

        def pump() -> None:
            nonlocal mi
            while mi < len(misses) and len(pending) < depth:
                pending.append((misses[mi], store.lease(misses[mi], counted=True)))
                mi += 1

        pump()

        def gen() -> Iterator[tuple[Key, Lease]]:
            nonlocal mi
            while pending or mi < len(misses):
                if pending:
                    k, fut = pending.popleft()
                else:  # depth 0 (a one-slot pool): strictly one at a time
                    k, fut = misses[mi], store.lease(misses[mi], counted=True)
                    mi += 1
                t1 = time.perf_counter()
                lease = fut.result()
                self.timers["io_wait_s"] += time.perf_counter() - t1
                pump()
                try:
                    yield k, lease
                finally:
                    lease.release()
        return gen()

    def _kernel_layer(self, keys: list[Key], x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                      qtypes: tuple[int, int, int]) -> torch.Tensor:
        """All host experts of a layer through the compiled kernels, in as few calls as the RAM slots allow
        (one per layer unless a long prefill needs more experts than the slots hold).

        The kernel computes one unweighted output row per (token, slot); the rows are weighted and summed over
        the slots afterwards in a fixed order, so the result does not depend on how experts were split into
        calls, i.e. on which tier held them. Returns float32 [T, H].
        """
        assert _kernels is not None
        T, K = idx.shape
        H = x.shape[1]
        # one row per (token, slot): a stride-0 view for one token (no copy), else one copy
        xr = x.float().expand(K, H) if T == 1 else x.float().unsqueeze(1).expand(T, K, H).reshape(T * K, H)
        rows = torch.zeros(T * K, H, dtype=torch.float32)
        ones = np.ones((T * K, 1), dtype=np.float32)
        lut = np.full(self.layout.n_experts, -1, dtype=np.int32)
        flat = idx.reshape(-1).numpy()
        cap = max(1, self.store.n_slots - 1)

        def run(leases: list[Lease]) -> None:
            t1 = time.perf_counter()
            lut.fill(-1)
            lut[[lease.key[1] for lease in leases]] = np.arange(len(leases), dtype=np.int32)
            _kernels.moe_experts(xr, [tuple(lease.views) for lease in leases], qtypes, lut[flat].reshape(-1, 1),
                                 ones, out=rows, accumulate=True)
            self.timers["cpu_compute_s"] += time.perf_counter() - t1

        for c0 in range(0, len(keys), cap):
            chunk = keys[c0:c0 + cap]
            leases = self.store.pin_resident(chunk)
            got = {lease.key for lease in leases}
            futs = [self.store.lease(k, counted=True) for k in chunk if k not in got]
            pending: set[Future] = set(futs)
            try:
                # the resident experts first while the misses stream in; then each batch of arrived misses (each
                # (token, slot) row is one expert's output, so how experts are split over calls changes nothing)
                if leases:
                    run(leases)
                    for lease in leases:
                        lease.release()
                leases = []
                while pending:
                    t1 = time.perf_counter()
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    self.timers["io_wait_s"] += time.perf_counter() - t1
                    leases = [f.result() for f in done]
                    run(leases)
                    for lease in leases:
                        lease.release()
                    leases = []
            finally:
                for lease in leases:
                    lease.release()
                for f in pending:  # an error above: let go of the leases still to arrive
                    f.add_done_callback(_release_when_done)
        # weighted sum over the slots as one batched product (torch's elementwise-then-sum took 0.15-0.5 ms here
        # for a single token: it woke the OpenMP pool)
        wf = w.detach().to("cpu", torch.float32)
        return torch.bmm(wf.view(T, 1, K), rows.view(T, K, H)).view(T, H)

    def _layer_qtypes(self, layer: int) -> tuple[int, int, int] | None:
        """The layer's (gate, up, down) kernel types (ggml's, or the interleaved ones the store holds them in) when
        every expert of it has a compiled kernel, else None."""
        if layer not in self._qtypes:
            qt = None
            if self.use_kernels:
                fmts = {e.formats for e in self.layout.entries[layer]}
                if len(fmts) == 1:
                    (f3,) = fmts
                    if all(f.kind == "ggml" and _kernels.supported(f.qtype) for f in f3):  # type: ignore
                        kt = self.store.kernel_types(f3)  # matrices the RAM tier holds interleaved
                        qt = tuple(int(k if k is not None else f.qtype) for f, k in zip(f3, kt))  # type: ignore
            self._qtypes[layer] = qt  # type: ignore[assignment]
        return self._qtypes[layer]

    def _cpu_expert(self, lease: Lease, xe: torch.Tensor) -> torch.Tensor:
        """Unweighted expert output for the rows xe, on the CPU (torch: dequantize, then matmul)."""
        return swiglu(xe, *lease.matrices(self.cpu_dtype))

    def _decodable_on_device(self, keys: list[Key]) -> bool:
        """Whether every expert in `keys` can go to the GPU as its raw bytes (fused kernels, or a torch decoder that
        runs there). Otherwise a big batch stays on the CPU kernels: dequantizing on the host to ship dense costs
        far more (gguf-py decodes one Kimi K2 IQ2_XXS expert in ~1 s)."""
        return all(self._ships_raw(self.layout.entry(*k)) for k in keys)

    def _ships_raw(self, entry) -> bool:
        """Whether the GPU computes this expert from its raw bytes: the fused kernels, or torch decoders there."""
        return fused_on_device(entry, self.device) or all(decodes_on_gpu(f) for f in entry.formats)

    def _run_on_device(self, keys: list[Key], x: torch.Tensor, group: Callable, outs: dict) -> None:
        """Big batch on CUDA: copy each host expert's bytes to the GPU (side stream) and compute there."""
        assert self._copy_stream is not None
        main = torch.cuda.current_stream(self.device)
        inflight: collections.deque[tuple[torch.cuda.Event, Lease]] = collections.deque()
        for key, lease in self._stream_keep(keys):
            fused = fused_on_device(lease.entry, self.device)  # ggml bytes straight into the Triton kernels
            raw = self._ships_raw(lease.entry)  # (False only if the fused kernels were turned off mid-batch)
            with torch.cuda.stream(self._copy_stream):
                if raw:
                    dv = [v.to(self.device, non_blocking=True) for v in lease.views]
                    nbytes = lease.entry.nbytes
                else:  # no GPU decoder for this type: dequantize on the host, ship dense
                    dv = [m.to(self.device, self.dtype, non_blocking=True) for m in lease.matrices(self.dtype)]
                    nbytes = sum(t.numel() * t.element_size() for t in dv)
                ev = torch.cuda.Event()
                ev.record(self._copy_stream)
            main.wait_event(ev)
            for t in dv:
                t.record_stream(main)
            if fused:
                outs[key[1]] = fused_or_dense(x[group(key[1])[0]], lease.entry, dv, self.dtype)
            else:
                if raw:
                    mats = [decode_matrix(f, vs, self.dtype) for f, vs in lease.entry.matrix_segments(dv)]
                else:
                    mats = dv
                outs[key[1]] = swiglu(x[group(key[1])[0]], *mats)
            self.shipped.bytes_read += nbytes
            self.shipped.hits += 1
            inflight.append((ev, lease))
            while inflight and (len(inflight) > 2 or inflight[0][0].query()):
                ev0, l0 = inflight.popleft()
                ev0.synchronize()
                l0.release()
        while inflight:
            ev0, l0 = inflight.popleft()
            ev0.synchronize()
            l0.release()

    def _stream_keep(self, keys: list[Key]) -> Iterator[tuple[Key, Lease]]:
        """Like _stream, but the consumer releases each lease itself (after its host-to-device copy)."""
        store = self.store
        depth = max(1, min(self.lookahead, store.n_slots - 3))
        pending: collections.deque[tuple[Key, Future]] = collections.deque()
        it = iter(keys)
        for k in it:
            pending.append((k, store.lease(k)))
            if len(pending) >= depth:
                break
        while pending:
            k, fut = pending.popleft()
            lease = fut.result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, store.lease(nxt)))
            yield k, lease

    # ------------------------------------------------------------------ prefetch
    def _prefetch_loop(self) -> None:
        assert self._prefetch_q is not None
        while True:
            item = self._prefetch_q.get()
            if item is None:
                return
            layer, x = item
            try:
                cands = self.predictor.predict(layer, x, self.top_k) if self.predictor else []
                cands = cands[:self.top_k]
                if x.shape[0] == 1:
                    self._guesses[layer] = set(cands)
                self.store.prefetch([(layer, e) for e in cands])
            except Exception:  # noqa: BLE001 (a failed guess must never break generation)
                pass

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        """Counters per tier, bytes of expert weights computed per token, and timers."""
        tiers: dict[str, Any] = {}
        served = 0
        if self.device_cache is not None:
            tiers["device"] = self.device_cache.counters.as_dict() | {"experts": len(self.device_cache),
                                                                       "bytes": self.device_cache.nbytes,
                                                                       "fused": self.device_cache.fused_experts}
            served += self.device_cache.counters.bytes_served
        tiers[self.store.tier] = self.store.counters.as_dict() | {"slots": self.store.n_slots,
                                                                  "cache_slots": self.store.cache_slots,
                                                                  "experts": len(self.store.keys),
                                                                  "bytes": self.store.nbytes}
        served += self.store.counters.bytes_served
        return {"tiers": tiers, "tokens": self.tokens, "expert_bytes": served,
                "expert_bytes_per_token": served / self.tokens if self.tokens else 0.0,
                "shipped_to_gpu_bytes": self.shipped.bytes_read, "timers": dict(self.timers),
                "disk_busy_s": self.store.busy.busy_s, "prediction_accuracy": self.prediction.accuracy,
                "kernels": _kernels.backend() if self.use_kernels and _kernels is not None else "torch"}

    def reset_stats(self) -> None:
        self.store.counters.reset()
        if self.device_cache is not None:
            self.device_cache.counters.reset()
        self.shipped.reset()
        self.store.busy.reset()
        self.prediction = PredictionCounters()
        self.tokens = 0
        self.timers.clear()

    def save_routing_stats(self, path: str | None = None) -> str | None:
        """Merge this run's routing counts into the saved file (for choosing GPU-resident experts next time)."""
        p = path or self.stats_path
        if not p:
            return None
        merged = RoutingStats.load_or_new(p, self.routing.n_layers, self.routing.n_experts, self.routing.model_id)
        merged.merge(self.routing)
        merged.save(p)
        self.routing.counts[:] = 0  # now in the file: a second save must not count them twice
        self.routing.tokens[:] = 0
        return str(p)

    def close(self) -> None:
        """Save routing stats (when a path is set), stop threads and close files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.routing.tokens.sum() > 0:
                self.save_routing_stats()
        except OSError:
            pass
        if self._prefetch_q is not None and self._prefetch_thread is not None:
            self._prefetch_q.put(None)  # blocks only while the queue is full, i.e. briefly
            self._prefetch_thread.join(5.0)
        if self._worker is not None:
            self._worker.shutdown(wait=True)
        self.store.close()
