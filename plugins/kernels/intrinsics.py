"""Small helpers for the kernels written as numba intrinsics in LLVM IR (imports numba).

numba's loops do not keep vector values in registers across iterations, nor
reduce them horizontally in one instruction; the few inner loops that need
that (the GEMM tile, the float32 argmax) build their IR with these. The
vectors are 16 lanes wide: AVX-512 where the CPU has it, split into narrower
vectors by LLVM where it has not.
"""

from __future__ import annotations

from typing import Any

from .numba_env import numba_module

LANES = 16


def ir_modules() -> tuple[Any, Any]:
    """llvmlite's ``ir`` and numba's ``cgutils``, imported with numba."""
    numba_module()
    from llvmlite import ir
    from numba.core import cgutils

    return ir, cgutils


def declare(builder: Any, name: str, result: Any, *args: Any) -> Any:
    """The LLVM intrinsic ``name`` (``llvm.fma.v16f32``...) in the builder's module."""
    ir, cgutils = ir_modules()
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, args), name)


def splat(builder: Any, value: Any, lanes: int = LANES) -> Any:
    """A vector of ``lanes`` copies of a scalar IR value."""
    ir, _ = ir_modules()
    vector = ir.Constant(ir.VectorType(value.type, lanes), ir.Undefined)
    zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    first = builder.insert_element(vector, value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(first, vector, zeros)


def element_pointer(builder: Any, base: Any, index: Any, kind: Any) -> Any:
    """``base + index`` elements of ``base``'s type, as a pointer to ``kind``."""
    return builder.bitcast(builder.gep(base, [index]), kind.as_pointer())
