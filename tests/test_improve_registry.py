import sqlite3
import subprocess
import sys

import pytest

from quark.improve.registry import Registry


def scores(right, n=40):
    """Per-item results: the first `right` of n items answered correctly."""
    return {"t": [{"id": f"d{i}", "acc": float(i < right)} for i in range(n)]}


def test_first_candidate_becomes_champion_then_the_paired_gate_decides(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.register("a", "/m/a", metrics={"t/acc": 0.5}, items=scores(20))
    assert reg.promote("a")[0] and reg.champion()["version"] == "a"
    reg.register("b", "/m/b", parent="a", items=scores(12))                 # 8 items lost, none won
    promoted, checks = reg.promote("b")
    assert not promoted and [c.regressed for c in checks] == [True]
    assert reg.champion()["version"] == "a" and reg.get("b")["stage"] == "candidate"
    reg.register("c", "/m/c", parent="b", items=scores(24))
    assert reg.promote("c")[0]
    assert reg.champion()["version"] == "c" and reg.get("a")["stage"] == "archived"
    assert reg.lineage("c") == ["c", "b", "a"]
    assert [e["event"] for e in reg.events("b")] == ["registered", "gate_failed"]
    assert reg.get("c")["items"] == scores(24)


def test_a_slow_slide_never_moves_the_baseline(tmp_path):
    """Each step loses 2 of 40 items: never significant against its predecessor, which is what the old
    gate compared with (and then made the new baseline). Against the fixed champion the losses add up."""
    reg = Registry(tmp_path / "r.sqlite")
    reg.register("v0", "/m/0", items=scores(30))
    reg.promote("v0")
    verdicts = []
    for k in range(1, 5):
        reg.register(f"v{k}", f"/m/{k}", items=scores(30 - 2 * k))
        promoted, checks = reg.promote(f"v{k}")
        verdicts.append((promoted, checks[0].regressed, checks[0].losses))
    assert reg.champion()["version"] == "v0"
    assert verdicts == [(False, False, 2), (False, False, 4), (False, True, 6), (False, True, 8)]
    assert reg.events("v1")[-1]["event"] == "held" and "behind the champion" in reg.events("v1")[-1]["detail"]


def test_no_common_items_is_no_evidence(tmp_path):
    reg = Registry(tmp_path / "r.sqlite")
    reg.register("a", "/a", items=scores(20))
    reg.promote("a")
    reg.register("b", "/b", items={"other": [{"id": "x", "acc": 1.0}]})
    assert reg.promote("b") == (False, []) and "no items in common" in reg.events("b")[-1]["detail"]


def test_registry_without_items_column_is_upgraded(tmp_path):
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.executescript("""CREATE TABLE models (version TEXT PRIMARY KEY, name TEXT NOT NULL, path TEXT NOT NULL,
        parent TEXT, stage TEXT NOT NULL, metrics TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, promoted_at REAL);
        INSERT INTO models VALUES ('a', 'n', '/a', NULL, 'champion', '{}', 0, 0);""")
    db.close()
    reg = Registry(tmp_path / "old.sqlite")
    assert reg.champion()["items"] == {}
    reg.register("b", "/b", items=scores(10))
    assert reg.promote("b") == (False, [])      # the old champion has no items: no evidence either way


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
