import pytest

from quark.tune import domain
from quark.config import ConfigError
from tests.tiny_lm import make_run, one_thread, write_jsonl  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_domain_adaptation_lowers_domain_loss_and_reports_both(tmp_path):
    run, _ = make_run(tmp_path)
    write_jsonl(run / "general.jsonl", [{"text": "the quick brown fox jumps over the lazy dog. hello world, how are you?"}] * 40)
    stats = domain.run_step(run, {"seed": 0, "general": "general.jsonl", "steps": 25, "batch_size": 4, "seq_len": 64,
                                  "lr": 5e-3, "replay": 0.25})
    assert stats["domain_loss_after"] < stats["domain_loss_before"] - 0.5
    assert stats["general_loss_after"] < stats["general_loss_before"]   # replay keeps the general corpus in view
    assert (run / "domain" / "final" / "model.safetensors").exists()


def test_domain_errors(tmp_path):
    run, _ = make_run(tmp_path)
    write_jsonl(run / "bad.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected an object with a string field 'text'"):
        domain.run_step(run, {"seed": 0, "general": "bad.jsonl"})
    with pytest.raises(ConfigError, match="replay"):
        domain.validate_config({"replay": 1.5})
