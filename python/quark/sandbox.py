"""Run untrusted generated code (a completion and its tests) in a separate, limited process.

Each run gets its own session and process group, `python -I` (no user site, no PYTHON* env) with a
cleared environment, an empty temporary working directory, and RLIMIT_AS / CPU / FSIZE / NOFILE /
NPROC / CORE limits. stdout is discarded; stderr goes to a file capped by RLIMIT_FSIZE, of which the
last OUTPUT_CAP bytes are read. Every exit path (normal exit, error, timeout) kills the whole group
and waits a bounded time. Where the platform allows (see isolation()):
- run by root: the program runs as `nobody`, so it cannot write the user's files or read their
  processes' /proc/<pid>/environ;
- with `unshare` and user namespaces: new user, pid, mount and network namespaces, so the program
  sees no network, only its own processes in a fresh /proc, and every process it starts, even one
  in a new session, dies with it (the kernel kills a pid namespace when its first process exits).
Without them the limits and the group kill still hold, but a child that calls setsid() can outlive
the run, and the program can read the environment of processes of the same uid.

Pass/fail is the harness's own report, never the exit code: the harness (trusted code run first)
reads a random token from stdin, runs the program then the tests, and only if both finished without
an exception (SystemExit included) writes the token to a report descriptor; `os._exit(0)` or
`sys.exit(0)` in a completion is therefore a failure. The harness binds what it calls before the
program runs, so monkey-patching builtins or os does not fake a report either; a program that digs
the token out of the harness's frames could, so this is a test bed, not a boundary against a
determined attacker with knowledge of the harness.
"""
import contextlib
import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

NOBODY = 65534
OUTPUT_CAP = 4096            # bytes of stderr kept for the caller
FILE_CAP = 1 << 20           # largest file the program may write (stderr included)
MAX_PROCESSES = 32           # RLIMIT_NPROC: counted per uid, so it bounds `nobody` system wide
MAX_FILES = 64               # RLIMIT_NOFILE
KILL_WAIT = 5.0              # seconds to wait for a killed process to be reaped
NAMESPACES = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]

# Trusted: runs before the program, holds what it needs in locals, reports only after the tests.
HARNESS = """\
import os, sys
def harness():
    token, report, write, exit, run, build = sys.stdin.readline().strip().encode(), int(sys.argv[3]), os.write, os._exit, exec, compile
    sources = []
    for path in sys.argv[1:3]:
        with open(path, encoding="utf-8") as f:
            sources.append((path, f.read()))
    sys.stdin.close()
    try:
        scope = {"__name__": "__main__", "__builtins__": __builtins__}
        for path, text in sources:
            run(build(text, path, "exec"), scope)
    except BaseException:
        import traceback
        traceback.print_exc()
        sys.stderr.flush()
        exit(1)
    write(report, token)
    exit(0)
harness()
"""


@dataclass
class SandboxResult:
    passed: bool
    status: str          # "passed" | "failed" | "timeout" | "memory"
    stderr: str = ""


def _drop_to_nobody():
    return os.geteuid() == 0


def _world_executable(path):
    """The interpreter must be reachable by `nobody`: every directory on the way o+x, the file o+x."""
    path = os.path.realpath(path)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] != os.path.dirname(parts[-1]):
        parts.append(os.path.dirname(parts[-1]))
    return all(os.stat(p).st_mode & 0o001 for p in parts)


@functools.cache
def _interpreter():
    if not _drop_to_nobody() or _world_executable(sys.executable):
        return sys.executable
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", "python3"):
        found = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
        if found and _world_executable(found):
            return found
    raise RuntimeError(f"no Python interpreter that user nobody may run ({sys.executable} is not world-executable)")


def _limits(memory_mb, cpu_seconds):
    def apply():   # in the child, after setsid and the uid drop, before exec
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_CAP, FILE_CAP))
        resource.setrlimit(resource.RLIMIT_NOFILE, (MAX_FILES, MAX_FILES))
        resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def _identity():
    return dict(user=NOBODY, group=NOBODY, extra_groups=[]) if _drop_to_nobody() else {}


@functools.cache
def _namespaces_work():
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(NAMESPACES + ["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10, **_identity()).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def isolation():
    """What this platform gives the sandbox beyond rlimits and the process-group kill."""
    ns = _namespaces_work()
    return {"separate_uid": _drop_to_nobody(), "namespaces": ns, "no_network": ns, "own_pid_namespace": ns}


def _kill_group(proc):
    """SIGKILL the whole process group (its leader is still unreaped, so the group id is not reused),
    then reap the leader within KILL_WAIT."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(KILL_WAIT)
    except subprocess.TimeoutExpired:
        pass


def _wait_exit(pid, timeout):
    """Wait until pid exits without reaping it -> False on timeout."""
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _tail(path):
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - OUTPUT_CAP))
        return f.read(OUTPUT_CAP).decode("utf-8", "replace")


def run_program(program, tests="", timeout=5.0, memory_mb=512):
    """Run program, then tests, in the sandbox -> SandboxResult (passed only on the harness's report)."""
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="quark-sandbox-") as tmp:
        os.chmod(tmp, 0o711)                     # nobody may pass through to code/ and work/, not list or read out/
        code, work, out = (os.path.join(tmp, d) for d in ("code", "work", "out"))
        os.mkdir(code, 0o755)
        os.mkdir(work, 0o700)
        os.mkdir(out, 0o700)
        if _drop_to_nobody():
            os.chown(work, NOBODY, NOBODY)
        for name, text in (("harness.py", HARNESS), ("program.py", program), ("tests.py", tests)):
            with open(os.path.join(code, name), "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(os.path.join(code, name), 0o644)
        report_path, stderr_path = os.path.join(out, "report"), os.path.join(out, "stderr")
        with open(report_path, "wb") as report, open(stderr_path, "wb") as stderr:
            argv = [_interpreter(), "-I", "-B"] + [os.path.join(code, n) for n in ("harness.py", "program.py", "tests.py")]
            argv = (NAMESPACES if _namespaces_work() else []) + argv + [str(report.fileno())]
            proc = subprocess.Popen(argv, bufsize=0, cwd=work, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr,
                                    env={"PATH": "/usr/bin:/bin"}, start_new_session=True,
                                    pass_fds=(report.fileno(),), preexec_fn=_limits(memory_mb, max(1, int(timeout) + 1)),
                                    **_identity())
            try:
                with contextlib.suppress(BrokenPipeError):   # the pipe buffer holds the token: never blocks
                    proc.stdin.write(token.encode() + b"\n")
                proc.stdin.close()
                finished = _wait_exit(proc.pid, timeout)
            finally:
                _kill_group(proc)
        err = _tail(stderr_path)
        with open(report_path, "rb") as f:
            reported = f.read(len(token) + 1) == token.encode()
        if not finished:
            return SandboxResult(False, "timeout", err)
        if reported:
            return SandboxResult(True, "passed", err)
        return SandboxResult(False, "memory" if "MemoryError" in err else "failed", err)

