"""The CMake flags that build llama.cpp's ggml for the x86 CPU this runs on, from /proc/cpuinfo.

`make peers` builds llama-cpp-python and `llama-server` with them. GGML_NATIVE (-march=native) is
off: a native build of llama-cpp-python 0.3.36 crashed on every prompt longer than one token on an
Intel host with AMX (shared/FACTS.md); each instruction set is named explicitly instead, and every
option is given ON or OFF so that nothing falls back to ggml's defaults (which turn AVX2, FMA, F16C
and BMI2 on whether or not the CPU has them).

    python3 benchmarks/ggml_cmake_args.py            # -DGGML_NATIVE=OFF -DGGML_AVX=ON ...
    python3 benchmarks/ggml_cmake_args.py --amx      # also AMX where the CPU has it
"""
from __future__ import annotations

import argparse
import platform

# ggml option -> the /proc/cpuinfo flags it needs (all of them). Order follows ggml/CMakeLists.txt.
X86_OPTIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX2": ("avx2",),
    "GGML_BMI2": ("bmi2",),
    # GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw.
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512f", "avx512vbmi"),
    "GGML_AVX512_VNNI": ("avx512f", "avx512_vnni"),
    "GGML_AVX512_BF16": ("avx512f", "avx512_bf16"),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
}
# ggml's AMX kernels run only on batches of more than one token: the suspect in the crash above, so
# they are opt-in (--amx).
AMX_OPTIONS = {
    "GGML_AMX_TILE": ("amx_tile",),
    "GGML_AMX_INT8": ("amx_tile", "amx_int8"),
    "GGML_AMX_BF16": ("amx_tile", "amx_bf16"),
}


def cpu_flags(cpuinfo: str) -> set[str]:
    """The flags of the first processor listed in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def cmake_args(flags: set[str], amx: bool = False) -> list[str]:
    """-D options for a non-native ggml build using exactly the instruction sets in `flags`."""
    options = X86_OPTIONS | AMX_OPTIONS
    wanted = {name: all(f in flags for f in needs) for name, needs in options.items()}
    if not amx:
        wanted.update(dict.fromkeys(AMX_OPTIONS, False))
    return ["-DGGML_NATIVE=OFF"] + [f"-D{name}={'ON' if on else 'OFF'}" for name, on in wanted.items()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amx", action="store_true", help="enable AMX tiles where the CPU has them")
    p.add_argument("--cpuinfo", default="/proc/cpuinfo")
    args = p.parse_args()
    if platform.machine() not in ("x86_64", "AMD64"):
        # Elsewhere (aarch64, ...) ggml's native detection is the only option it documents.
        print("-DGGML_NATIVE=ON")
        return
    with open(args.cpuinfo) as f:
        print(" ".join(cmake_args(cpu_flags(f.read()), amx=args.amx)))


if __name__ == "__main__":
    main()
