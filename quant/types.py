"""The one ggml type table: every GGUF tensor type's block geometry, derived from gguf-py, and which of them k2local
computes on directly.

    info(qtype)              -> QTypeInfo (name, block_size, type_size, bits_per_weight, ...)
    row_bytes(qtype, cols)   bytes of one row of `cols` values
    qtype_of("q4_k" | 12)    -> GGMLQuantizationType

Block sizes and bytes come from ``gguf.constants.GGML_QUANT_SIZES`` (the ids are ``GGMLQuantizationType``'s, which
are llama.cpp's); nothing here restates them.  What this file adds is data about k2local itself:
  C_KERNEL_TYPES       types the CPU kernels (offload/kernels/csrc) multiply on their bytes; the C library's own type
                       table must list the same ids (tests/test_quant_types.py checks it against gguf)
  TRITON_KERNEL_TYPES  types the fused GPU kernels (offload/kernels/triton_q.py) decode
  FLOAT_TYPES          plain float storage (F32, F16, BF16): no gain from keeping them "quantized"
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

QType = GGMLQuantizationType

__all__ = ["QType", "QTypeInfo", "C_KERNEL_TYPES", "TRITON_KERNEL_TYPES", "FLOAT_TYPES", "TYPES", "qtype_of", "info",
           "block_size", "type_size", "row_bytes", "bits_per_weight", "file_type"]

FLOAT_TYPES: tuple[QType, ...] = (QType.F32, QType.F16, QType.BF16)
C_KERNEL_TYPES: tuple[QType, ...] = (
    QType.Q4_0, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
    QType.IQ2_XXS, QType.IQ2_XS, QType.IQ3_XXS, QType.IQ1_S, QType.IQ4_NL, QType.IQ3_S, QType.IQ2_S, QType.IQ4_XS,
    QType.IQ1_M,
)
TRITON_KERNEL_TYPES: tuple[QType, ...] = (
    QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K,
    QType.Q6_K, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ3_XXS, QType.IQ1_S, QType.IQ4_NL, QType.IQ3_S, QType.IQ2_S,
    QType.IQ4_XS, QType.IQ1_M,
)


@dataclass(frozen=True)
class QTypeInfo:
    """One ggml type: `block_size` values are stored in `type_size` bytes."""

    qtype: QType
    block_size: int
    type_size: int

    @property
    def name(self) -> str:
        return self.qtype.name

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def is_float(self) -> bool:
        return self.qtype in FLOAT_TYPES

    @property
    def c_kernel(self) -> bool:
        return self.qtype in C_KERNEL_TYPES

    @property
    def triton_kernel(self) -> bool:
        return self.qtype in TRITON_KERNEL_TYPES


TYPES: dict[QType, QTypeInfo] = {QType(t): QTypeInfo(QType(t), blk, size) for t, (blk, size) in GGML_QUANT_SIZES.items()}


def qtype_of(name_or_type: str | int | QType) -> QType:
    """'Q4_K' / 'q4_k' / 12 -> GGMLQuantizationType (ValueError for names and ids gguf does not know)."""
    if isinstance(name_or_type, str):
        try:
            return QType[name_or_type.upper()]
        except KeyError:
            raise ValueError(f"unknown ggml type {name_or_type!r}") from None
    try:
        return QType(int(name_or_type))
    except ValueError:
        raise ValueError(f"unknown ggml type id {name_or_type!r}") from None


@functools.lru_cache(maxsize=None)  # ints, enum members and numpy integers of one id share an entry
def info(qtype: str | int | QType) -> QTypeInfo:
    """The type's QTypeInfo (ValueError for unknown types)."""
    qt = qtype_of(qtype)
    try:
        return TYPES[qt]
    except KeyError:
        raise ValueError(f"gguf has no block size for ggml type {qt.name}") from None


def block_size(qtype: str | int | QType) -> int:
    """Values per block (256 for K-quants and most IQ types, 32 for the legacy ones, 1 for float types)."""
    return info(qtype).block_size


def type_size(qtype: str | int | QType) -> int:
    """Bytes per block."""
    return info(qtype).type_size


def row_bytes(qtype: str | int | QType, cols: int) -> int:
    """Bytes of one row of `cols` values in `qtype` (ValueError: unknown type, or cols not a whole number of blocks)."""
    t = info(qtype)
    if cols % t.block_size:
        raise ValueError(f"{t.name} needs a multiple of {t.block_size} columns, got {cols}")
    return cols // t.block_size * t.type_size


def bits_per_weight(qtype: str | int | QType) -> float:
    return info(qtype).bits_per_weight


def file_type(name: str) -> int:
    """gguf's LlamaFileType value (general.file_type) named after a type: 'F32' -> ALL_F32, 'Q4_K_M' -> MOSTLY_Q4_K_M.
    ValueError when gguf has no such file type."""
    key = "ALL_F32" if name.upper() == "F32" else "MOSTLY_" + name.upper()
    try:
        return int(LlamaFileType[key])
    except KeyError:
        raise ValueError(f"gguf has no llama file type {key}") from None
