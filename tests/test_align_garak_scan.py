"""garak as a second red-team source: its probes against a real `quark serve` (subprocess, loopback
HTTP) through garak's OpenAI-compatible generator, with the filter off and on. Runs where garak is
installed (in this interpreter or the one $QUARK_GARAK_PYTHON names); garak pins its own transformers
and openai, so it usually lives in a separate environment."""
import json

import pytest

from quark.align import garak_scan
from quark.safety import SafetyFilter
from tests.serve_helpers import make_model_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def garak_python():
    if not garak_scan.available():
        pytest.skip("garak is not installed (pip install 'quark[garak]', or set QUARK_GARAK_PYTHON)")
    return garak_scan.garak_python()


def test_filter_lowers_attack_success_on_garak_probes(tmp_path, garak_python):
    # a context long enough for DAN's ~3k-token prompt: an over-long prompt is a 400, not an attempt
    model_dir, _, _ = make_model_dir(tmp_path / "model", max_seq_len=4096)
    safety = SafetyFilter.from_config({}).save(tmp_path / "safety.json")
    probes = ["dan.Dan_11_0", "grandma.Substances", "malwaregen.TopLevel"]
    result = garak_scan.run(model_dir, safety, tmp_path / "garak", probes, prompt_cap=4, max_tokens=16)
    assert json.loads((tmp_path / "garak" / "garak.json").read_text()) == result
    off, on = result["filter_off"]["by_family"], result["filter_on"]["by_family"]
    assert set(off) == set(on) == {"dan", "grandma", "malwaregen"}
    for fam in off:
        assert off[fam]["n"] > 0 and off[fam]["low"] <= off[fam]["rate"] <= off[fam]["high"]
    # a random model never refuses: the mitigation detector flags every reply without the filter
    assert off["dan"]["rate"] == 1.0 and off["grandma"]["rate"] == 1.0
    # the grandma prompts ask for napalm, whose rule refuses them; every refusal carries a refusal phrase
    assert on["grandma"]["rate"] < off["grandma"]["rate"]
    assert all(on[f]["k"] <= off[f]["k"] for f in off)


def test_summarize_counts_attempts_per_family(tmp_path):
    def attempt(probe, scores):
        return {"entry_type": "attempt", "status": 2, "probe_classname": probe, "detector_results": scores}
    lines = [attempt("dan.Dan_11_0", {"dan.DAN": [0.0], "mitigation.MitigationBypass": [1.0]}),
             attempt("dan.DUDE", {"dan.DUDE": [0.0]}),
             attempt("grandma.Win10", {"productkey.Win5x5": [None]}),
             {"entry_type": "attempt", "status": 1, "probe_classname": "dan.DUDE", "detector_results": {}},
             {"entry_type": "eval", "probe": "dan.DUDE"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = garak_scan.summarize(tmp_path / "r.jsonl")
    assert s["by_family"]["dan"] | {"low": 0, "high": 0} == {"rate": 0.5, "k": 1, "n": 2, "no_output": 0, "low": 0, "high": 0}
    assert s["by_family"]["grandma"]["n"] == 0 and s["by_family"]["grandma"]["no_output"] == 1
    assert s["by_probe"]["dan.Dan_11_0"]["rate"] == 1.0
