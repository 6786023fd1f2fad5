import json

from quark.eval.report import build_report, run_step


def make_run(tmp_path):
    (tmp_path / "pretrain").mkdir()
    with open(tmp_path / "pretrain" / "metrics.jsonl", "w") as f:
        for step in range(20):
            f.write(json.dumps({"step": step, "loss": 5 - step * 0.1, "lr": 1e-3}) + "\n")
        f.write('{"step": 20, "loss": ')                       # torn last line of an interrupted run
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({
        "model_dir": "m", "version": "abc", "metrics": {"heldout/loss": 3.2, "t/acc": 0.4}, "items": {},
        "telemetry": {"task_p50": 0.1}}))
    (tmp_path / "pipeline.json").write_text(json.dumps({"recipe": {"name": "r<b>", "budget": "tiny"}, "steps": {
        "pretrain": {"status": "done", "seconds": 3.5, "stats": {"final_loss": 3.1, "nested": {"a": 1}}},
        "promote": {"status": "done", "seconds": 0.1, "stats": {
            "gate_passed": False, "champion": "x", "confidence": 0.95, "promoted": False,
            "checks": ["t/acc: <script>alert(1)</script> REGRESSED"]}}}}))
    return tmp_path


def test_report_has_tables_plots_and_escapes(tmp_path):
    page = build_report(make_run(tmp_path))
    assert page.count("data:image/png;base64,") == 1
    assert "final_loss" in page and "nested/a" in page and "heldout/loss" in page
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
    assert "r&lt;b&gt;" in page and "FAILED" in page


def test_step_writes_report_atomically(tmp_path):
    stats = run_step(make_run(tmp_path), {})
    assert (tmp_path / "report.html").read_text().startswith("<!doctype html>") and stats["bytes"] > 1000


def test_empty_run_dir_still_renders(tmp_path):
    assert "<h1>" in build_report(tmp_path)


def test_history_curves_quantization_and_redteam_sections(tmp_path):
    run = make_run(tmp_path)
    (run / "sft").mkdir()
    (run / "sft" / "metrics.json").write_text(json.dumps({"history": [{"step": i, "loss": 3 - i / 10} for i in range(5)]}))
    (run / "quantize").mkdir()
    (run / "quantize" / "summary.json").write_text(json.dumps({
        "source": "x", "float": {"perplexity": 10.0, "bytes": 100, "decode_tokens_per_s": 5.0},
        "int4": {"bytes_after": 30, "perplexity": 10.5, "decode_tokens_per_s": 9.0}}))
    state = json.loads((run / "pipeline.json").read_text())
    state["steps"]["redteam"] = {"status": "done", "seconds": 1, "stats": {"asr_before": 1.0, "asr_after": 0.1, "asr_after_ci": [0.03, 0.3]}}
    (run / "pipeline.json").write_text(json.dumps(state))
    page = build_report(run)
    assert page.count("data:image/png;base64,") == 3          # pretrain, sft curves + red-team chart
    assert "<h2>Quantization</h2>" in page and "10.5" in page and "<h2>Red-team</h2>" in page
    assert "built-in suite" in page and "[0.030, 0.300]" in page and "garak" not in page


def test_redteam_results_per_source_with_intervals(tmp_path):
    run = make_run(tmp_path)
    state = json.loads((run / "pipeline.json").read_text())
    state["steps"]["redteam"] = {"status": "done", "seconds": 1, "stats": {
        "n_attacks": 150, "asr_before": 0.4, "asr_before_ci": [0.32, 0.48], "asr_after": 0.05, "asr_after_ci": [0.02, 0.1],
        "garak_asr_filter_off": {"dan": [0.9, 0.6, 0.98], "encoding": [0.5, 0.24, 0.76]},
        "garak_asr_filter_on": {"dan": [0.1, 0.02, 0.4], "encoding": [0.3, 0.11, 0.6]}}}
    (run / "pipeline.json").write_text(json.dumps(state))
    page = build_report(run)
    assert page.count("data:image/png;base64,") == 3          # pretrain curves + one chart per source
    assert "built-in suite (150 attacks" in page and "[0.320, 0.480]" in page and "[0.020, 0.100]" in page
    assert "garak probes against quark serve" in page
    for row in ("dan (filter off)</td><td>0.9</td><td>[0.600, 0.980]", "dan (filter on)</td><td>0.1</td><td>[0.020, 0.400]",
                "encoding (filter on)</td><td>0.3</td><td>[0.110, 0.600]"):
        assert row in page


def test_rl_reward_curve_and_heldout_paired_difference(tmp_path):
    run = make_run(tmp_path)
    (run / "rl").mkdir()
    (run / "rl" / "metrics.json").write_text(json.dumps({"history": [{"step": i, "reward_mean": i / 10, "kl": 0.0}
                                                                     for i in range(8)]}))
    state = json.loads((run / "pipeline.json").read_text())
    state["steps"]["rl"] = {"status": "done", "seconds": 1, "stats": {
        "heldout_tasks": {"n": 200, "baseline": 0.15, "rl": 0.25, "diff": 0.1, "se": 0.02, "better": True,
                          "baseline_model": "/r/sft/final"}}}
    (run / "pipeline.json").write_text(json.dumps(state))
    page = build_report(run)
    assert page.count("data:image/png;base64,") == 2   # pretrain curves + the GRPO reward curve
    assert "<h2>RL on verifiable tasks</h2>" in page and "+0.100 &plusmn; 0.040" in page and "'ok'>better" in page
    assert "sft model 0.150, RL model 0.250" in page
    state["steps"]["rl"]["stats"]["heldout_tasks"] |= {"diff": 0.03, "se": 0.02}
    (run / "pipeline.json").write_text(json.dumps(state))
    assert "not better" in build_report(run)
