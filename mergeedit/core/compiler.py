"""What torch.compile needs on the CPU, found once for every user of it (the merge's fused kernels, R-SFT's compiled
layers): a C++ compiler, and the vector width inductor's code is generated for."""

from __future__ import annotations

import functools
from typing import Optional


@functools.cache
def missing_compiler() -> Optional[str]:
    """None when inductor finds a C++ compiler for CPU code; else one line saying what is missing."""
    try:
        from torch._inductor import cpp_builder

        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # noqa: BLE001 - any failure to find one means: stay eager
        return f"no C++ compiler for torch.compile ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def simd_bits() -> int:
    """The vector width (bits) inductor generates CPU code for in this process: that of the ISA ATen's dispatch uses
    (ATEN_CPU_CAPABILITY, else the CPU's best), 0 for scalar code."""
    from torch._inductor import cpu_vec_isa

    return cpu_vec_isa.pick_vec_isa().bit_width()


def inductor_options() -> dict:
    """Options for every torch.compile of this package. torch 2.13's FX graph cache leaves the vector width out of its
    key, yet the cached wrapper embeds C++ whose loops step by the width it was generated for, and the C++ is rebuilt
    with the flags of the process that loads it: code generated for AVX-512 (step 16) loaded where ATen runs AVX2 (8
    lanes) leaves half of each output block unwritten, and the reverse writes past the output's end. Naming the width
    puts it in the key, so each ISA gets code of its own."""
    return {"cpp.simdlen": simd_bits()}
