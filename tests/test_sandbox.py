"""The code sandbox against hostile programs, each attack run for real: escaped and surviving
children, a fork bomb, a flood of stderr, reading the parent's environment, writing the user's files,
reaching the network, and completions that fake a pass by exiting early."""
import os
import re
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from quark.sandbox import MAX_PROCESSES, OUTPUT_CAP, isolation, run_program


def run_bounded(limit, *args, **kwargs):
    """run_program in a thread: a sandbox that never returns fails the test instead of hanging it."""
    out = []
    t = threading.Thread(target=lambda: out.append(run_program(*args, **kwargs)), daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(limit)
    assert out, f"run_program did not return within {limit} s"
    return out[0], time.monotonic() - t0


def test_passing_and_failing_programs():
    assert run_program("def f(x):\n    return x + 1\n", "assert f(1) == 2\n").status == "passed"
    r = run_program("def f(x):\n    return x\n", "assert f(1) == 2\n")
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr
    r = run_program("def f(:\n", "")
    assert not r.passed and "SyntaxError" in r.stderr


@pytest.mark.parametrize("exit_call", ["import os; os._exit(0)", "import sys; sys.exit(0)", "raise SystemExit",
                                       "import builtins; builtins.exec = lambda *a, **k: None",
                                       "import os; os.write = lambda *a: 0; os._exit = lambda *a: None"])
def test_a_program_cannot_fake_a_pass(exit_call):
    """Exit code 0 is not a pass: only the harness's report, written after the tests ran, is."""
    r = run_program(f"def f(x):\n    return x\n{exit_call}\n", "assert f(1) == 2\n")
    assert not r.passed and r.status == "failed"


def test_printing_a_pass_marker_does_not_pass():
    r = run_program("import os, sys\nfor fd in range(1, 10):\n    try:\n        os.write(fd, b'passed\\n' * 100)\n"
                    "    except OSError:\n        pass\nos._exit(0)\n", "")
    assert not r.passed


def test_infinite_loop_is_killed_at_the_timeout():
    r, took = run_bounded(20, "while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout" and took < 10


def test_a_child_in_its_own_session_holding_stderr_open_cannot_stall_it():
    """Before: killpg missed the setsid child and the second communicate() waited for its stderr forever."""
    prog = textwrap.dedent("""\
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
        """)
    r, took = run_bounded(30, prog, timeout=1.0)
    assert r.status == "timeout" and took < 10


@pytest.mark.parametrize("setsid", [False, True])
def test_children_do_not_outlive_the_program(tmp_path, setsid):
    drop = tmp_path / "drop"
    drop.mkdir()
    drop.chmod(0o777)   # writable by whichever uid the sandbox runs as
    prog = textwrap.dedent(f"""\
        import os, time
        if os.fork() == 0:
            if {setsid}:
                os.setsid()
            time.sleep(1.5)
            open({str(drop / "alive")!r}, "w").write("still running")
            os._exit(0)
        """)
    r, _ = run_bounded(30, prog, "")
    assert r.passed, r.stderr
    time.sleep(3)
    assert not (drop / "alive").exists(), "a child of the program kept running after it exited"


def test_fork_bomb_is_bounded():
    prog = textwrap.dedent("""\
        import os, time
        n = 0
        try:
            for _ in range(300):
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
                n += 1
        except OSError as e:
            raise SystemExit(f"fork refused after {n}: {e}")
        """)
    r, took = run_bounded(30, prog, "", timeout=3.0)
    refused = re.search(r"fork refused after (\d+):", r.stderr)
    assert not r.passed and refused, r.stderr
    assert int(refused[1]) < MAX_PROCESSES


def test_stderr_flood_is_read_bounded(tmp_path):
    """300 MB on stderr: the caller's memory stays bounded (before, communicate() read all of it)."""
    script = textwrap.dedent("""\
        import resource, sys
        from quark.sandbox import run_program
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = run_program("import sys\\nfor _ in range(300):\\n    sys.stderr.write('x' * (1 << 20))\\n", "", timeout=20)
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(r.status, len(r.stderr), grew >> 10)
        """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    status, n, grew_mb = out.stdout.split()
    assert status == "failed" and int(n) <= OUTPUT_CAP and int(grew_mb) < 50, out.stdout + out.stderr


def test_runs_in_an_empty_directory_with_a_cleared_environment():
    r = run_program("import os, sys\nassert os.listdir('.') == [], os.listdir('.')\n"
                    "assert set(os.environ) <= {'PATH', 'LC_CTYPE'}, dict(os.environ)\nassert sys.flags.isolated\n", "")
    assert r.passed, r.stderr


def test_cannot_read_the_parent_environment(monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("QUARK_TEST_SECRET", secret)
    prog = textwrap.dedent(f"""\
        import os
        found = []
        for pid in [{os.getpid()}, os.getppid()] + [p for p in os.listdir('/proc') if p.isdigit()]:
            try:
                if {secret!r}.encode() in open(f'/proc/{{pid}}/environ', 'rb').read():
                    found.append(pid)
            except OSError:
                pass
        assert not found, f'read the secret from /proc/{{found}}/environ'
        """)
    r = run_program(prog, "")
    assert r.passed, r.stderr


@pytest.mark.skipif(not isolation()["separate_uid"], reason="the sandbox runs as the caller's uid here")
def test_cannot_write_the_users_files(tmp_path):
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    r = run_program(f"open({str(victim)!r}, 'w').write('owned')\n", "")
    assert not r.passed and "PermissionError" in r.stderr
    assert victim.read_text() == "mine"


@pytest.mark.skipif(not isolation()["no_network"], reason="no network namespace on this platform")
def test_no_network():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n", "")
    assert not r.passed and ("ConnectionRefused" in r.stderr or "OSError" in r.stderr), r.stderr


def test_memory_is_bounded():
    r = run_program("x = bytearray(2 * 1024 ** 3)\n", "", memory_mb=256)
    assert not r.passed and r.status == "memory"


def test_file_size_is_bounded():
    r = run_program("open('big', 'wb').write(b'x' * (4 << 20))\n", "")
    assert not r.passed
