"""llama.cpp as a benchmark peer: build llama-cpp-python from its source distribution once, cache it.

`python -m benchmarks.llamacpp [--version V]` downloads the sdist (pip download --no-binary), builds a wheel
with AMX off (its AMX path crashed on this machine) and every other x86 feature this CPU has switched on
explicitly (GGML_NATIVE=OFF, since -march=native would turn AMX back on), and unpacks it into
$QUARK_BENCH_CACHE/llamacpp/site (default ~/.cache/quark-bench). Benchmarks call `load()`, which returns the
`llama_cpp` module from there or None when it was never built (they then print "skipped"); the shared venv
is left alone. The build takes many minutes on two busy cores: run it once, niced, before the benchmark.
"""
import argparse
import glob
import os
import subprocess
import sys
from pathlib import Path

VERSION = "0.3.36"


def cache_root():
    return Path(os.environ.get("QUARK_BENCH_CACHE", Path.home() / ".cache" / "quark-bench"))


def site_dir():
    return cache_root() / "llamacpp" / "site"


def cmake_args():
    """GGML flags for this CPU's ISA with AMX off; AVX-512 parts only where /proc/cpuinfo lists them."""
    try:
        flags = set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        flags = set()
    on = {"GGML_SSE42": "sse4_2", "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
          "GGML_BMI2": "bmi2", "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512bw",
          "GGML_AVX512_VBMI": "avx512vbmi", "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}
    args = ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
            "-DLLAVA_BUILD=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
            "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release"]
    return args + [f"-D{k}={'ON' if v in flags else 'OFF'}" for k, v in on.items()]


def build(version=VERSION, jobs=2):
    """Download the sdist, build the wheel, unpack it into site_dir(); no-op when already there."""
    if (site_dir() / "llama_cpp" / "__init__.py").exists():
        return site_dir()
    work = cache_root() / "llamacpp"
    (work / "sdist").mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run(pip + ["download", "--no-deps", "--no-binary", ":all:", "-d", str(work / "sdist"),
                          f"llama-cpp-python=={version}"], check=True)
    env = dict(os.environ, CMAKE_ARGS=" ".join(cmake_args()), CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
    sdist = glob.glob(str(work / "sdist" / f"llama_cpp_python-{version}.tar.gz"))[0]
    subprocess.run(pip + ["wheel", "--no-deps", "-w", str(work / "wheel"), sdist], check=True, env=env)
    wheel = glob.glob(str(work / "wheel" / "llama_cpp_python-*.whl"))[0]
    # --target unpacks the wheel beside nothing else: the venv others share stays as it was. Of its
    # dependencies only diskcache is missing there (numpy, jinja2, typing-extensions come with the venv,
    # and a second numpy ahead of torch's on sys.path would break it).
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site_dir()), wheel, "diskcache"], check=True)
    return site_dir()


def load():
    """The llama_cpp module from the cached build, or None when it was never built."""
    if not (site_dir() / "llama_cpp" / "__init__.py").exists():
        return None
    if str(site_dir()) not in sys.path:
        sys.path.insert(0, str(site_dir()))
    import llama_cpp
    return llama_cpp


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m benchmarks.llamacpp", description=__doc__)
    p.add_argument("--version", default=VERSION)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    print("built into", build(args.version, args.jobs))
