import json
import subprocess
import sys

from quark import cli


def quark_cmd(*args):
    return subprocess.run([sys.executable, "-m", "quark.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_registered_command():
    r = quark_cmd("--help")
    assert r.returncode == 0
    for name in cli.COMMANDS:
        assert name in r.stdout


def test_every_command_module_has_the_cli_contract():
    import importlib
    for name, (module, help_text) in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.configure_parser) and callable(mod.run_cli), name
        assert help_text


def test_info_command_json():
    r = quark_cmd("info", "--json")
    assert r.returncode == 0, r.stderr
    assert "distance" in json.loads(r.stdout)["kernel_paths"]


def test_info_command_table():
    r = quark_cmd("info")
    assert r.returncode == 0 and "kernel family" in r.stdout


def test_no_command_prints_help_and_fails():
    r = quark_cmd()
    assert r.returncode == 2 and "COMMAND" in r.stdout


def test_unknown_command_is_rejected():
    r = quark_cmd("frobnicate")
    assert r.returncode == 2 and "invalid choice" in r.stderr
