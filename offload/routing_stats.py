"""Per-layer routed-expert usage counts: recorded while running, saved as JSON, reused to pick resident experts."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "k2local-routing-stats-1"


class RoutingStats:
    """counts[layer][expert] = how many tokens chose that expert; `tokens[layer]` tokens seen per layer."""

    def __init__(self, n_layers: int, n_experts: int, model_id: str = ""):
        self.n_layers, self.n_experts, self.model_id = n_layers, n_experts, model_id
        self.counts = np.zeros((n_layers, n_experts), dtype=np.int64)
        self.tokens = np.zeros(n_layers, dtype=np.int64)
        self._lock = threading.Lock()

    def record(self, layer: int, idx: torch.Tensor | np.ndarray) -> None:
        """Count the experts chosen for a batch: idx [T, K] of expert ids."""
        a = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        binc = np.bincount(a.reshape(-1), minlength=self.n_experts)
        with self._lock:
            self.counts[layer] += binc[: self.n_experts]
            self.tokens[layer] += a.shape[0] if a.ndim > 1 else 1

    def merge(self, other: "RoutingStats") -> None:
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"routing stats shape {other.counts.shape} != {self.counts.shape}")
        with self._lock:
            self.counts += other.counts
            self.tokens += other.tokens

    def usage(self, layer: int) -> np.ndarray:
        """Probability that a token uses each expert of `layer` (uniform when nothing was recorded)."""
        c = self.counts[layer].astype(np.float64)
        t = float(self.tokens[layer])
        if t <= 0 or c.sum() <= 0:
            return np.full(self.n_experts, 1.0 / self.n_experts)
        return c / c.sum()

    def hot(self, n: int, layers: list[int]) -> list[tuple[int, int]]:
        """The `n` (layer, expert) pairs most likely to be used by a token, across `layers`, hottest first.

        With no counts for a layer, its experts tie; ties are broken by spreading picks evenly over layers.
        """
        if n <= 0 or not layers:
            return []
        cand = []
        for layer in layers:
            u = self.usage(layer)
            for e in range(self.n_experts):
                cand.append((-u[e], e, layer))
        cand.sort()
        return [(layer, e) for _, e, layer in cand[:n]]

    def coverage(self, layer: int, experts: set[int] | list[int]) -> float:
        """Fraction of `layer`'s expert uses that fall on `experts`."""
        u = self.usage(layer)
        return float(sum(u[e] for e in experts))

    def top_coverage(self, layer: int, n: int) -> float:
        """Fraction of uses covered by the `n` most used experts of `layer`."""
        if n <= 0:
            return 0.0
        u = np.sort(self.usage(layer))[::-1]
        return float(u[:n].sum())

    def as_prior(self, layers: list[int], tokens: float = 64.0) -> dict[tuple[int, int], float]:
        """Counts as (layer, expert) -> score, for seeding a frequency cache policy: each layer's usage weighted
        as much as `tokens` decoded tokens would be (top-k uses each), so this run's own routing overtakes a
        stale prior after a few times that many tokens."""
        out: dict[tuple[int, int], float] = {}
        for layer in layers:
            c = self.counts[layer].astype(np.float64)
            t = float(self.tokens[layer])
            if t <= 0 or c.sum() <= 0:
                continue
            per_token = c / t  # uses of each expert per token (sums to top-k)
            for e in np.nonzero(c)[0]:
                out[(layer, int(e))] = float(per_token[e]) * tokens
        return out

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "model_id": self.model_id, "n_layers": self.n_layers,
                "n_experts": self.n_experts, "tokens": self.tokens.tolist(), "counts": self.counts.tolist()}

    def save(self, path: str | Path) -> None:
        """Write atomically (temp file + rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_json()))
        tmp.replace(p)

    @classmethod
    def load(cls, path: str | Path, n_layers: int | None = None, n_experts: int | None = None) -> "RoutingStats":
        """Read a saved file; ValueError if it is not one, or is for a different model shape."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p}: cannot read routing stats ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{p}: not a k2local routing stats file")
        s = cls(int(d["n_layers"]), int(d["n_experts"]), str(d.get("model_id", "")))
        if (n_layers is not None and s.n_layers != n_layers) or (n_experts is not None and s.n_experts != n_experts):
            raise ValueError(f"{p}: stats are for {s.n_layers} layers x {s.n_experts} experts, "
                             f"the model has {n_layers} x {n_experts}")
        s.counts = np.asarray(d["counts"], dtype=np.int64).reshape(s.n_layers, s.n_experts)
        s.tokens = np.asarray(d["tokens"], dtype=np.int64).reshape(s.n_layers)
        return s

    @classmethod
    def load_or_new(cls, path: str | Path | None, n_layers: int, n_experts: int, model_id: str = ""
                    ) -> "RoutingStats":
        if path is not None and Path(path).exists():
            try:
                return cls.load(path, n_layers, n_experts)
            except ValueError:
                pass
        return cls(n_layers, n_experts, model_id)


def default_stats_path(model_id: str) -> Path:
    """Where routing stats for a model are kept between runs ($K2LOCAL_CACHE or ~/.cache/k2local)."""
    root = Path(os.environ.get("K2LOCAL_CACHE", Path.home() / ".cache" / "k2local"))
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)[:120]
    return root / "routing" / f"{safe}.json"
