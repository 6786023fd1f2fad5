"""quark.info(), ISA capping (in-process and through QUARK_ISA), threads (QUARK_NUM_THREADS)."""
import json
import os
import subprocess
import sys

import pytest

import quark
from quark import _C
from tests.conftest import SUPPORTED_ISAS


def run_py(code, **env):
    full = dict(os.environ, **env)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def test_info_reports_everything():
    info = quark.info()
    for key in ("version", "cpu_features", "isa", "isa_detected", "kernel_paths", "threads", "torch", "triton",
                "cuda_available", "cuda_kernels_built"):
        assert key in info
    assert info["version"] == quark.__version__
    assert "distance" in info["kernel_paths"]
    assert info["threads"] == quark.num_threads() >= 1


def test_isa_context_caps_and_restores():
    top = _C.current_isa()
    with quark.isa("scalar"):
        assert _C.current_isa() == "scalar"
        assert set(quark.info()["kernel_paths"].values()) == {"scalar"}
    assert _C.current_isa() == top


def test_isa_cannot_exceed_cpu_and_names_must_be_known():
    with pytest.raises(ValueError, match="isa must be one of"):
        _C.set_isa("sse9")
    if _C.detected_isa() != "amx":
        with pytest.raises(ValueError, match="not supported by this CPU"):
            _C.set_isa("amx")


@pytest.mark.parametrize("level", SUPPORTED_ISAS)
def test_quark_isa_env_forces_level_in_a_fresh_process(level):
    r = run_py("import quark, json; print(json.dumps(quark.info()))", QUARK_ISA=level)
    info = json.loads(r.stdout)
    assert info["isa"] == level
    assert info["kernel_paths"]["distance"] in SUPPORTED_ISAS[: SUPPORTED_ISAS.index(level) + 1]


def test_unknown_quark_isa_warns_and_is_ignored():
    r = run_py("import quark; print(quark.info()['isa'])", QUARK_ISA="nonsense")
    assert r.stdout.strip() == _C.detected_isa()
    assert "QUARK_ISA='nonsense' is not one of" in r.stderr


def test_num_threads_env_and_setter():
    r = run_py("import quark; print(quark.num_threads())", QUARK_NUM_THREADS="3")
    assert r.stdout.strip() == "3"
    before = quark.num_threads()
    quark.set_num_threads(1)
    assert quark.num_threads() == 1
    quark.set_num_threads(before)
    with pytest.raises(ValueError, match="positive integer"):
        quark.set_num_threads(0)


def test_bad_num_threads_env_is_a_clear_error():
    full = dict(os.environ, QUARK_NUM_THREADS="many")
    r = subprocess.run([sys.executable, "-c", "import quark"], capture_output=True, text=True, env=full, timeout=120)
    assert r.returncode != 0 and "QUARK_NUM_THREADS must be a positive integer" in r.stderr


def test_cuda_selftest_when_built_with_cuda():
    if not _C.has_cuda():
        pytest.skip("built without QUARK_CUDA")
    if _C.cuda_device_count() == 0:
        pytest.skip("no CUDA device")
    assert _C.cuda_selftest(4096)
