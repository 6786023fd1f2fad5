import dataclasses
import json
import subprocess
import sys

import pytest

from quark import cli
from quark.cli import main
from quark.recipe import STEPS, load_step


def quark_cmd(*args):
    return subprocess.run([sys.executable, "-m", "quark.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_registered_command():
    r = quark_cmd("--help")
    assert r.returncode == 0
    for name in cli.COMMANDS:
        assert name in r.stdout


def test_help_imports_no_torch():
    code = ("import sys, quark, quark.cli; quark.cli.build_parser(); "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('torch', 'quark')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_every_tool_module_has_the_cli_contract():
    import importlib
    for name, (module, help_text) in cli.TOOLS.items():
        mod = importlib.import_module(module)
        assert callable(mod.configure_parser) and callable(mod.run_cli), name
        assert help_text


@pytest.mark.parametrize("name", list(STEPS))
def test_every_step_command_is_generated_from_its_settings(name):
    step = load_step(name)
    assert step.name == name and dataclasses.is_dataclass(step.config)
    sub = cli.build_parser(name)._subparsers._group_actions[0].choices[name]
    flags = {o for a in sub._actions for o in a.option_strings}
    assert {"--run-dir", "--config", "--set"} <= flags
    fields = [f.name for f in dataclasses.fields(step.config)]
    setting_flags = [a for a in sub._actions if a.dest.startswith("setting_")]
    assert sorted(a.dest for a in setting_flags) == sorted(f"setting_{f}" for f in fields)   # one flag per field
    for a in setting_flags:
        assert "(default: " in a.help, (name, a.dest)


def test_step_help_shows_the_field_comments_and_defaults():
    r = quark_cmd("sft", "--help")
    assert r.returncode == 0
    assert "--lora-rank" in r.stdout and "(default: 8)" in r.stdout
    assert "longest example in tokens" in r.stdout           # the comment beside SFTConfig.max_len


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


def test_scrape_and_clean_from_the_command_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"m{i}.py").write_text(f"def function_number_{i}(value):\n    return value * {i} + {i}\n" * 3)
    run = tmp_path / "run"
    assert main(["scrape", "--run-dir", str(run), "--roots", str(src), "--max-files", "5", "--seed", "3"]) == 0
    stats = json.loads((run / "scrape" / "stats.json").read_text())
    assert stats["kept"] == 5
    manifest = json.loads((run / "scrape" / "manifest.json").read_text())
    assert manifest["config"]["max_files"] == 5 and manifest["config"]["seed"] == 3
    assert main(["clean", "--run-dir", str(run), "--no-pii", "--min-chars", "10"]) == 0
    assert json.loads((run / "clean" / "stats.json").read_text())["kept"] == {"code": 5}
    assert set(json.loads((run / "clean" / "manifest.json").read_text())["inputs"]) == {"scrape/files-00000.jsonl"}


def test_config_file_then_set_then_flags(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"max_files": 3, "min_file_bytes": 10, "roots": [str(tmp_path / "src")]}))
    (tmp_path / "src").mkdir()
    for i in range(6):
        (tmp_path / "src" / f"m{i}.py").write_text(f"x_{i} = {i}\n" * 4)
    run = tmp_path / "run"
    assert main(["scrape", "--run-dir", str(run), "--config", str(cfg), "--set", "max_files=4", "--set",
                 "min_file_bytes=12"]) == 0
    assert json.loads((run / "scrape" / "stats.json").read_text())["kept"] == 4
    assert main(["scrape", "--run-dir", str(run), "--config", str(cfg), "--set", "max_files=4", "--max-files", "2"]) == 0
    assert json.loads((run / "scrape" / "manifest.json").read_text())["config"]["max_files"] == 2


def test_bad_values_are_reported(tmp_path, capsys):
    assert main(["dedup", "--run-dir", str(tmp_path), "--threshold", "2"]) == 2
    assert "dedup.threshold" in capsys.readouterr().out
    assert main(["dedup", "--run-dir", str(tmp_path), "--set", "treshold=0.5"]) == 2
    assert "unknown key 'treshold'" in capsys.readouterr().out
    assert main(["dedup", "--run-dir", str(tmp_path), "--set", "threshold"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().out
    assert main(["dedup", "--run-dir", str(tmp_path), "--config", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().out
    assert main(["pack", "--run-dir", str(tmp_path)]) == 1
    assert "run the dedup step first" in capsys.readouterr().out
