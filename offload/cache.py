"""Cache policy for expert slots (frequency with aging, or LRU) and the hit/miss counters every tier reports."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Hashable, Iterable, Protocol

Key = Hashable


@dataclass
class CacheCounters:
    """What happened in one tier. A prefetch hit is a demand hit on an expert that a prefetch brought in."""

    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_hits: int = 0
    evictions: int = 0
    bytes_read: int = 0  # bytes brought into this tier (disk reads, host-to-device copies)
    bytes_served: int = 0  # bytes of expert weights computed from this tier
    miss_bytes: int = 0  # bytes of demanded experts that had to be read (misses and prefetch hits)

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def cache_hit_rate(self) -> float:
        """Demand uses found resident without a prefetch's help (what the cache itself holds)."""
        return (self.hits - self.prefetch_hits) / self.requests if self.requests else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Share of started prefetches that a layer then used."""
        return self.prefetch_hits / self.prefetch_issued if self.prefetch_issued else 0.0

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = dict(asdict(self))
        d["hit_rate"] = self.hit_rate
        d["cache_hit_rate"] = self.cache_hit_rate
        d["prefetch_precision"] = self.prefetch_precision
        return d

    def reset(self) -> None:
        for k in asdict(self):
            setattr(self, k, 0)


class CachePolicy(Protocol):
    """Chooses which resident key to evict. `request` is called on every demand use (hit or miss)."""

    def request(self, key: Key) -> None: ...

    def score(self, key: Key) -> float: ...

    def victim(self, resident: Iterable[Key]) -> Key | None: ...


class FrequencyPolicy:
    """Least-frequently-used with aging: every request adds 1; every `half_life` requests all counts halve.

    Counts are kept for keys that are not resident too, so an expert that keeps being asked for wins its slot
    back from one that was hot long ago. Routing is skewed, so this keeps more of the hot experts than LRU.
    Optional `prior` counts (saved routing statistics) seed the scores.
    """

    def __init__(self, half_life: int = 4096, prior: dict[Key, float] | None = None):
        self.half_life = max(1, half_life)
        self.counts: dict[Key, float] = dict(prior or {})
        self._n = 0
        self._lock = threading.Lock()

    def request(self, key: Key) -> None:
        with self._lock:
            self.counts[key] = self.counts.get(key, 0.0) + 1.0
            self._n += 1
            if self._n >= self.half_life:
                self._n = 0
                self.counts = {k: v * 0.5 for k, v in self.counts.items() if v >= 0.01}

    def score(self, key: Key) -> float:
        return self.counts.get(key, 0.0)

    def victim(self, resident: Iterable[Key]) -> Key | None:
        return min(resident, key=self.score, default=None)


class LRUPolicy:
    """Least recently used (for comparison; frequency is the default)."""

    def __init__(self) -> None:
        self._clock = 0
        self.last: dict[Key, int] = {}
        self._lock = threading.Lock()

    def request(self, key: Key) -> None:
        with self._lock:
            self._clock += 1
            self.last[key] = self._clock

    def score(self, key: Key) -> float:
        return float(self.last.get(key, 0))

    def victim(self, resident: Iterable[Key]) -> Key | None:
        return min(resident, key=self.score, default=None)


def make_policy(name: str = "frequency", prior: dict[Key, float] | None = None) -> CachePolicy:
    if name in ("frequency", "lfu"):
        return FrequencyPolicy(prior=prior)
    if name == "lru":
        return LRUPolicy()
    raise ValueError(f"unknown cache policy {name!r} (frequency or lru)")
