"""Reference expert backend: every routed expert held dequantized in one device's memory."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F


def swiglu(x: torch.Tensor, g: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """One expert's unweighted output: down(silu(gate x) * up x) for dense gate, up, down matrices."""
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def moe_reference(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, get_expert) -> torch.Tensor:
    """y[t] = sum_k w[t,k] * down(silu(gate x) * up x) for expert idx[t,k]; get_expert(e) -> (gate, up, down)."""
    y = torch.zeros_like(x)
    for e in idx.unique().tolist():
        tok, slot = (idx == e).nonzero(as_tuple=True)
        out = swiglu(x[tok], *get_expert(e))
        y.index_add_(0, tok, out * w[tok, slot, None])
    return y


class DenseExperts:
    """All experts of all MoE layers as dense tensors: the all-in-memory baseline other backends must match."""

    def __init__(self, experts: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]):
        self.experts = experts

    @classmethod
    def load(cls, names: Mapping[int, Sequence[tuple[str, str, str]]],
             get: Callable[[str, torch.dtype], torch.Tensor], dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None) -> "DenseExperts":
        """Load every routed expert: names[layer][e] is expert e's (gate, up, down) tensor names, each read
        dequantized by get(name, dtype); progress(nbytes) after each expert."""
        ex: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for layer, row in names.items():
            ex[layer] = []
            for triple in row:
                mats = tuple(get(n, dtype).to(device) for n in triple)
                ex[layer].append(mats)  # type: ignore[arg-type]
                if progress:
                    progress(sum(m.numel() * m.element_size() for m in mats))
        return cls(ex)

    def forward(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return moe_reference(x, idx, w, lambda e: self.experts[layer][e])
