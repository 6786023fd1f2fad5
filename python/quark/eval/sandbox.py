"""Run untrusted generated code in a separate, limited process.

Each program runs in a fresh `python -I` (isolated: no user site, no PYTHON* env) in an empty
temporary directory with a minimal environment, under RLIMIT_AS (memory), RLIMIT_CPU and
RLIMIT_FSIZE, plus a wall-clock timeout that kills the whole process group. This bounds time,
memory and disk; it is not a security boundary against a determined attacker (no seccomp/network
namespace), so only run model outputs here, never the network-facing server.
"""
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class SandboxResult:
    passed: bool
    status: str          # "passed" | "failed" | "timeout" | "memory"
    stderr: str = ""


def _limits(memory_mb, cpu_seconds):
    def apply():
        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(source, timeout=5.0, memory_mb=512):
    with tempfile.TemporaryDirectory(prefix="quark-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w") as f:
            f.write(source)
        proc = subprocess.Popen([sys.executable, "-I", path], cwd=tmp, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"},
                                preexec_fn=_limits(memory_mb, max(1, int(timeout) + 1)))
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult(False, "timeout")
        err = err.decode("utf-8", "replace")[-2000:]
        if proc.returncode == 0:
            return SandboxResult(True, "passed", err)
        return SandboxResult(False, "memory" if "MemoryError" in err else "failed", err)
