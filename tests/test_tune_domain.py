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


def test_domain_adaptation_of_a_hugging_face_directory(tmp_path):
    """init = an HF Llama directory (save_pretrained): its own tokenizer and eos separate the documents,
    training lowers the domain loss, and the adapted model keeps the checkpoint's tokenizer and template."""
    pytest.importorskip("transformers")
    from quark.model.io import load_model
    from quark.rundir import RunDir
    from tests.hf_helpers import make_hf_model
    make_hf_model(tmp_path / "hf", "llama", max_position_embeddings=128)
    run = tmp_path / "run"
    write_jsonl(run / "code.jsonl", [{"text": f"def f{i}(x):\n    return x + {i}\n"} for i in range(60)])
    write_jsonl(run / "docs.jsonl", [{"text": "the quick brown fox jumps over the lazy dog."}] * 60)
    chat = RunDir(run).chat(tmp_path / "hf")
    stream = domain.tokenize_corpus(run / "docs.jsonl", chat.tokenizer, chat.eos_id, 10_000)
    assert chat.eos_id == chat.tokenizer.token_to_id("<|im_end|>") and stream[-1] == chat.eos_id
    stats = domain.run_step(run, {"seed": 0, "init": str(tmp_path / "hf"), "domain": "code.jsonl",
                                  "general": "docs.jsonl", "steps": 20, "batch_size": 4, "seq_len": 32, "lr": 5e-3})
    assert stats["domain_loss_after"] < stats["domain_loss_before"] - 0.5
    final = run / "domain" / "final"
    assert (final / "chat_template.jinja").exists() and (final / "tokenizer.json").exists()
    assert load_model(final).config.vocab_size == chat.tokenizer.get_vocab_size()
