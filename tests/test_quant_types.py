"""quant.types is gguf's ggml type table, and the C kernels' type ids are gguf's GGMLQuantizationType values."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from quant import types as qt

CSRC = Path(__file__).resolve().parents[1] / "offload" / "kernels" / "csrc"


def test_table_is_ggufs():
    assert set(qt.TYPES) == set(GGML_QUANT_SIZES)
    for t, (blk, size) in GGML_QUANT_SIZES.items():
        i = qt.info(int(t))
        assert (i.qtype, i.name, i.block_size, i.type_size) == (t, t.name, blk, size)
        assert qt.info(t.name.lower()) is i and qt.row_bytes(t, 3 * blk) == 3 * size
    assert qt.row_bytes("Q4_K", 7168) == 28 * 144 and qt.row_bytes(qt.QType.IQ2_XXS, 7168) == 28 * 66
    assert qt.row_bytes(qt.QType.F32, 3) == 12 and qt.bits_per_weight("Q8_0") == 8.5
    with pytest.raises(ValueError, match="multiple of 256"):
        qt.row_bytes("Q4_K", 100)
    with pytest.raises(ValueError):
        qt.info(99)
    with pytest.raises(ValueError):
        qt.qtype_of("Q9_K")
    assert [t.name for t in qt.FLOAT_TYPES] == ["F32", "F16", "BF16"] and qt.info("BF16").is_float
    assert set(qt.C_KERNEL_TYPES) < set(qt.TRITON_KERNEL_TYPES)
    assert qt.file_type("F32") == LlamaFileType.ALL_F32 and qt.file_type("q4_k_m") == LlamaFileType.MOSTLY_Q4_K_M


def test_c_sources_use_ggufs_type_ids():
    """The C enum (csrc/common.h: GT_<name> = id) and the type table built from it (csrc/isa.c: TY(name, blk, bytes))
    name exactly quant.types' C_KERNEL_TYPES, with gguf's ids and block geometry; no compiler needed."""
    from offload.kernels import OWN_TYPES

    enum = {n: int(v) for n, v in re.findall(r"\bGT_(\w+) = (\d+)", (CSRC / "common.h").read_text())}
    assert {n: enum.pop(n) for n in OWN_TYPES} == OWN_TYPES  # the library's own layouts, ids past gguf's
    assert {GGMLQuantizationType[n]: v for n, v in enum.items()} == {t: int(t) for t in qt.C_KERNEL_TYPES}
    rows = [r for r in re.findall(r"\bTY\((\w+), (\d+), (\d+)\)", (CSRC / "isa.c").read_text())
            if r[0] not in OWN_TYPES]
    assert sorted(n for n, _, _ in rows) == sorted(t.name for t in qt.C_KERNEL_TYPES)
    for n, blk, size in rows:
        assert GGML_QUANT_SIZES[GGMLQuantizationType[n]] == (int(blk), int(size)), n


def test_c_library_type_table_matches_gguf():
    """The compiled library's own answer (k2k_type_name, k2k_row_bytes) for every id gguf knows and a few it does
    not: a name exactly for quant.types.C_KERNEL_TYPES, gguf's name and block geometry."""
    from offload import kernels as K

    lib = K._load()
    if lib is None:
        pytest.skip(f"compiled kernels unavailable: {K.load_error()}")
    for i in range(64):
        name = lib.k2k_type_name(i)
        if i in {int(t) for t in qt.C_KERNEL_TYPES}:
            t = GGMLQuantizationType(i)
            blk, size = GGML_QUANT_SIZES[t]
            assert name is not None and name.decode() == t.name, i
            assert lib.k2k_row_bytes(i, 2 * blk) == 2 * size and lib.k2k_row_bytes(i, blk + 1) == -1, t.name
        else:
            assert name is None and lib.k2k_row_bytes(i, 256) == -1, i
    assert K.C_TYPES == {int(t): t.name for t in qt.C_KERNEL_TYPES}


def test_triton_table_is_derived():
    from offload.kernels import triton_q as tq

    assert tq.QTYPES == {int(t): (t.name, *GGML_QUANT_SIZES[t]) for t in qt.TRITON_KERNEL_TYPES}
