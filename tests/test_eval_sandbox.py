from quark.eval.sandbox import run_program


def test_passing_and_failing_programs():
    assert run_program("assert 1 + 1 == 2\n").status == "passed"
    r = run_program("assert 1 + 1 == 3\n")
    assert not r.passed and r.status == "failed" and "AssertionError" in r.stderr


def test_infinite_loop_is_killed_at_the_timeout():
    r = run_program("while True:\n    pass\n", timeout=1.0)
    assert r.status == "timeout"


def test_memory_is_bounded():
    r = run_program("x = bytearray(2 * 1024 ** 3)\n", memory_mb=256)
    assert not r.passed and r.status == "memory"


def test_runs_isolated_in_an_empty_directory_without_our_environment():
    r = run_program("import os, sys\nassert os.listdir('.') == ['program.py']\n"
                    "assert 'QUARK_SECRET' not in os.environ\nassert sys.flags.isolated\n")
    assert r.passed, r.stderr


def test_file_size_is_bounded():
    r = run_program("open('big', 'wb').write(b'x' * (4 << 20))\n")
    assert not r.passed
