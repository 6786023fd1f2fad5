"""RunDir: paths, the pack, the tokenizer, model(which) through the one lineage table, and the
manifests behind resume by content."""
import json
import os

import pytest

from quark.model.io import save_model
from quark.rundir import LINEAGE, RunDir
from tests._train_util import make_run_dir
from tests.tiny_lm import tiny_model


def model_in(run, step, sub="final", seed=0):
    return save_model(tiny_model(97, seed=seed), run / step / sub)


def test_pack_is_parsed_once_and_names_the_missing_step(tmp_path):
    run = RunDir(make_run_dir(tmp_path / "run", vocab_size=256, train_tokens=500, val_tokens=100))
    pack = run.pack()
    assert (pack.dtype, pack.vocab_size, len(pack.tokens("val"))) == ("uint16", 256, 100)
    assert run.pack() is pack
    assert run.reads >= {run.root / "pack" / "meta.json", run.root / "pack" / "train.bin", run.root / "pack" / "val.bin"}
    with pytest.raises(FileNotFoundError, match="run the pack step first"):
        RunDir(tmp_path / "empty").pack()
    (run.root / "pack" / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks 'dtype'"):
        RunDir(run.root).pack()


def test_tokenizer_beside_the_model_wins_over_the_runs(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="run the tokenizer step first"):
        run.tokenizer_path()
    (run.root / "tokenizer").mkdir(parents=True)
    (run.root / "tokenizer" / "tokenizer.json").write_text("{}")
    model_dir = model_in(run.root, "sft")
    assert run.tokenizer_path(model_dir) == run.root / "tokenizer" / "tokenizer.json"
    (model_dir / "tokenizer.json").write_text("{}")
    assert run.tokenizer_path(model_dir) == model_dir / "tokenizer.json"


def test_every_model_step_of_the_lineage_can_be_latest_or_named(tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="holds no trained model"):
        run.model("latest")
    for step in ("pretrain", "domain", "sft", "dpo", "rl"):
        model_in(run.root, step)
        assert run.model("latest") == run.root / step / "final"        # rl and domain included
        assert run.model(step) == run.root / step / "final"
    model_in(run.root, "distill", "student")
    model_in(run.root, "quantize", "int8")
    assert run.model("latest") == run.root / "rl" / "final"            # compressed copies are not "latest"
    assert run.model("distill") == run.root / "distill" / "student"
    assert run.model("quantize") == run.root / "quantize" / "int8"
    assert run.model("latest", before="dpo") == run.root / "sft" / "final"
    assert run.model("auto", before="sft") == run.root / "domain" / "final"
    assert run.model("sft/final") == run.root / "sft" / "final"       # a directory relative to the run
    assert run.model(str(run.root / "dpo" / "final")) == run.root / "dpo" / "final"
    with pytest.raises(FileNotFoundError, match="no config.json"):
        run.model(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="writes no model"):
        run.step_model("pack")
    assert {s for s, _, _ in LINEAGE} == {"pretrain", "domain", "sft", "dpo", "rl", "distill", "quantize"}


def test_best_is_the_lowest_held_out_loss(tmp_path):
    run = RunDir(tmp_path / "run")
    for seed, step in enumerate(("pretrain", "sft", "dpo")):
        model_in(run.root, step, seed=seed)
    scores = {"pretrain": 3.0, "sft": 1.0, "dpo": 2.0}
    best, losses = run.choose_model("best", held_out_loss=lambda model, d: scores[d.parent.name])
    assert best == run.root / "sft" / "final" and sorted(losses.values()) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="held-out loss"):
        run.model("best")


def test_locate_a_run_or_a_model_directory(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.root / "tokenizer").mkdir(parents=True)
    (run.root / "tokenizer" / "tokenizer.json").write_text("{}")
    model_in(run.root, "pretrain")
    model_in(run.root, "rl")
    found, model_dir = RunDir.locate(run.root)
    assert found.root == run.root and model_dir == run.root / "rl" / "final"
    found, model_dir = RunDir.locate(run.root / "pretrain" / "final")
    assert found.root == run.root and model_dir == run.root / "pretrain" / "final"
    lone = model_in(tmp_path, "m", "x")
    assert RunDir.locate(lone) == (None, lone)


def test_manifest_up_to_date_by_content_not_by_time(tmp_path):
    run = RunDir(tmp_path / "run")
    (run.root / "dedup").mkdir(parents=True)
    src = run.root / "dedup" / "docs.jsonl"
    src.write_text('{"id": "1", "text": "a"}\n')
    assert run.up_to_date("tokenizer", {"vocab_size": 10}) == (False, "not run yet")
    run.input("dedup", "docs.jsonl")
    run.output("tokenizer")
    run.write_manifest("tokenizer", {"vocab_size": 10})
    assert json.loads(run.manifest_path("tokenizer").read_text())["inputs"]["dedup/docs.jsonl"]["size"] == src.stat().st_size
    fresh = RunDir(run.root)
    assert fresh.up_to_date("tokenizer", {"vocab_size": 10}) == (True, "")
    assert fresh.up_to_date("tokenizer", {"vocab_size": 11}) == (False, "settings changed")
    st = src.stat()
    src.write_text('{"id": "1", "text": "a"}\n')                     # same bytes, new mtime: still up to date
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert fresh.up_to_date("tokenizer", {"vocab_size": 10}) == (True, "")
    src.write_text('{"id": "1", "text": "b"}\n')                     # same size, other content
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    assert fresh.up_to_date("tokenizer", {"vocab_size": 10}) == (False, "dedup/docs.jsonl changed")
    src.unlink()
    assert fresh.up_to_date("tokenizer", {"vocab_size": 10}) == (False, "dedup/docs.jsonl is gone")


def test_a_folder_read_is_fingerprinted_file_by_file(tmp_path):
    run = RunDir(tmp_path / "run")
    d = model_in(run.root, "sft")
    run.model("sft")
    run.output("dpo")
    inputs = run.write_manifest("dpo", {})["inputs"]
    assert set(inputs) == {"sft/final/model.safetensors", "sft/final/config.json"}
    save_model(tiny_model(97, seed=5), d)                             # sft reran with another result
    assert RunDir(run.root).up_to_date("dpo", {}) == (False, "sft/final/model.safetensors changed")


def test_tokens_in_a_models_own_vocabulary(tmp_path):
    """The pack's held-out documents, decoded with the run's tokenizer and encoded with an HF model's
    own (its eos after each): the same ids transformers' tokenizer gives the documents' text."""
    import numpy as np
    import transformers

    from quark.data.pack import is_val
    from tests.hf_helpers import make_hf_model, make_packed_run
    run, docs = make_packed_run(tmp_path)
    hf = tmp_path / "hf"
    make_hf_model(hf)
    rd = RunDir(run)
    assert rd.same_tokenizer(run / "tokenizer") is True and rd.same_tokenizer(hf) is False
    np.testing.assert_array_equal(rd.tokens("val"), rd.pack().tokens("val"))     # the run's own: the pack
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    val = [d["text"] for d in docs if is_val(d["id"], 0, 0.2)] or [docs[-1]["text"]]
    expect = [i for text in val for i in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert tok.eos_token_id == 2 and max(expect) < 320
    assert rd.tokens("val", hf).tolist() == expect
    assert rd.tokens("val", hf, max_tokens=50).tolist() == expect[:50]


def test_a_base_model_is_the_runs_latest_model_and_tokenizer(tmp_path):
    from quark.io import atomic_write_json
    from tests.hf_helpers import make_hf_model
    base = tmp_path / "base"
    make_hf_model(base)
    run = RunDir(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="base_model"):
        run.model("latest")
    atomic_write_json(run.state_path, {"steps": {}, "recipe": {"base_model": str(base)}})
    assert run.model("latest") == run.model("base") == run.model("auto", before="sft") == base
    assert run.tokenizer_path() == base / "tokenizer.json" and run.chat().stop_ids == {0, 2}
    sft = model_in(run.root, "sft")
    assert run.model("latest") == sft and run.model("latest", before="sft") == base
    assert run.trained_models() == [("base", base), ("sft", sft)]
    base.rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="base_model .* is not a model directory"):
        run.model("latest")
