"""benchmarks/ggml_cmake_args.py: the CPU flags `make peers` builds llama.cpp with (nothing is built)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "ggml_cmake_args.py"
spec = importlib.util.spec_from_file_location("ggml_cmake_args", SCRIPT)
ggml_cmake_args = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ggml_cmake_args)

AVX512 = "avx512f avx512cd avx512vl avx512dq avx512bw"
SAPPHIRE_RAPIDS = f"sse4_2 avx avx2 fma f16c bmi2 avx_vnni {AVX512} avx512vbmi avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16"


def options(flags: str, **kw) -> dict[str, str]:
    args = ggml_cmake_args.cmake_args(set(flags.split()), **kw)
    assert all(a.startswith("-D") for a in args)
    return dict(a[2:].split("=") for a in args)


def test_every_option_is_explicit_and_native_is_off():
    got = options("")
    assert got["GGML_NATIVE"] == "OFF"
    assert set(got) == {"GGML_NATIVE"} | set(ggml_cmake_args.X86_OPTIONS) | set(ggml_cmake_args.AMX_OPTIONS)
    assert set(got.values()) == {"OFF"}  # ggml's own defaults would turn AVX2, FMA, F16C and BMI2 on


def test_avx2_host_without_avx512():
    got = options("sse4_2 avx avx2 fma f16c bmi2")
    on = {k for k, v in got.items() if v == "ON"}
    assert on == {"GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_FMA", "GGML_F16C", "GGML_BMI2"}


def test_avx512_needs_all_five_subsets_and_extensions_need_it():
    assert options("avx512f avx512_vnni")["GGML_AVX512"] == "OFF"
    assert options("avx512f avx512_vnni")["GGML_AVX512_VNNI"] == "ON"  # ggml adds -mavx512vnni alone
    assert options("avx512_vnni")["GGML_AVX512_VNNI"] == "OFF"
    got = options(f"{AVX512} avx512_bf16")
    assert got["GGML_AVX512"] == got["GGML_AVX512_BF16"] == "ON"


def test_amx_only_when_asked():
    assert {options(SAPPHIRE_RAPIDS)[k] for k in ggml_cmake_args.AMX_OPTIONS} == {"OFF"}
    assert {options(SAPPHIRE_RAPIDS, amx=True)[k] for k in ggml_cmake_args.AMX_OPTIONS} == {"ON"}
    assert options("amx_int8", amx=True)["GGML_AMX_INT8"] == "OFF"  # no tiles, no AMX


def test_cpu_flags_reads_the_first_processor():
    text = "processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    assert ggml_cmake_args.cpu_flags(text) == {"fpu", "avx2", "fma"}
    assert ggml_cmake_args.cpu_flags("processor : 0\n") == set()
