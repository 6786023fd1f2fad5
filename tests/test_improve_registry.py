import sqlite3
import subprocess
import sys

import pytest

from quark.improve.registry import Registry


def test_first_candidate_becomes_champion_then_gate_decides(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.register("a", "/m/a", metrics={"x/loss": 2.0, "x/acc": 0.5})
    assert reg.promote("a")[0] and reg.champion()["version"] == "a"
    reg.register("b", "/m/b", parent="a", metrics={"x/loss": 2.5, "x/acc": 0.5})      # worse loss
    promoted, checks = reg.promote("b")
    assert not promoted and any(c.regressed for c in checks)
    assert reg.champion()["version"] == "a" and reg.get("b")["stage"] == "candidate"
    reg.register("c", "/m/c", parent="b", metrics={"x/loss": 1.9, "x/acc": 0.6})
    assert reg.promote("c")[0]
    assert reg.champion()["version"] == "c" and reg.get("a")["stage"] == "archived"
    assert reg.lineage("c") == ["c", "b", "a"]
    assert [e["event"] for e in reg.events("b")] == ["registered", "gate_failed"]


def test_at_most_one_champion_is_enforced_by_the_database(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.register("a", "/a")
    reg.register("b", "/b")
    reg.promote("a")
    with pytest.raises(sqlite3.IntegrityError):
        reg.db.execute("UPDATE models SET stage = 'champion' WHERE version = 'b'")


def test_errors(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    with pytest.raises(ValueError, match="parent version 'zz' is not registered"):
        reg.register("a", "/a", parent="zz")
    with pytest.raises(KeyError, match="not registered"):
        reg.promote("nope")
    (tmp_path / "bad.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a valid SQLite database"):
        Registry(tmp_path / "bad.sqlite")


def test_cli_register_promote_list(tmp_path, tiny_model_dir):
    db = str(tmp_path / "r.sqlite")
    q = lambda *a: subprocess.run([sys.executable, "-m", "quark.cli", "registry", "--db", db, *a],
                                  capture_output=True, text=True, timeout=120)
    r = q("register", str(tiny_model_dir))
    assert r.returncode == 0 and "as candidate" in r.stdout
    version = r.stdout.split()[1]
    assert q("promote", version).returncode == 0
    assert "champion" in q("list").stdout
    assert q("show", "nope").returncode == 2


def test_registry_command_reads_what_the_promote_step_wrote(tmp_path, tiny_model_dir):
    """`quark registry --run-dir R` opens the registry the promote step of run R wrote (it looked in
    runs/registry.sqlite while the step wrote R/registry.sqlite)."""
    import json
    import shutil

    from quark.eval.harness import model_version
    from quark.improve.registry import run_step
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "pretrain" / "final")
    import torch

    from quark.model.io import load_model, save_model
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        model.tok_emb.weight.mul_(2.0)        # the rl step changed the weights: another version
    save_model(model, run / "rl" / "final", tokenizer_path=tiny_model_dir / "tokenizer.json")
    version = model_version(run / "rl" / "final")
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"version": version, "model_dir": str(run / "rl" / "final"),
                                                           "metrics": {"x/acc": 0.5}}))
    stats = run_step(run, {})
    assert stats["promoted"] and stats["champion"] == version
    q = lambda *a: subprocess.run([sys.executable, "-m", "quark.cli", "registry", *a], capture_output=True, text=True,
                                  timeout=120, cwd=tmp_path)
    r = q("--run-dir", str(run), "list")
    assert r.returncode == 0 and version in r.stdout and "champion" in r.stdout and "run/rl" in r.stdout
    assert "run/pretrain" in r.stdout and f"parent={model_version(run / 'pretrain' / 'final')}" in r.stdout
    r = q("--run-dir", str(tmp_path / "other"), "list")
    assert r.returncode == 2 and "run the promote step" in r.stdout
