import math

import pytest
import torch

from quark.align import dpo
from quark.align.dpo import DPOConfig, heldout_metrics, optimize, preference_loss, reference_logps
from quark.align.pairs import encode_pairs, pad_id
from quark.tune import instruct
from tests.test_align_reward import WORDS, preference_pairs
from tests.tiny_lm import make_run, one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(extra=[" ".join(WORDS)] * 5)


def test_losses_at_the_reference():
    pi = torch.tensor([-3.0, -5.0, -4.0, -4.0])
    n = torch.tensor([2.0, 2.0, 4.0, 4.0])
    loss, m = preference_loss("dpo", pi, pi, n, 2, beta=0.1)
    assert math.isclose(float(loss), math.log(2), rel_tol=1e-6) and float(m["reward_margin"]) == 0
    loss, _ = preference_loss("ipo", pi, pi, n, 2, beta=0.1)
    assert math.isclose(float(loss), (1 / 0.2) ** 2, rel_tol=1e-6)
    loss, m = preference_loss("simpo", pi, pi * 0, n, 2, beta=2.0, gamma=0.5)
    h = 2.0 * (pi[:2] / 2 - pi[2:] / 4)
    assert math.isclose(float(loss), float(-torch.nn.functional.logsigmoid(h - 0.5).mean()), rel_tol=1e-6)


@pytest.mark.parametrize("kind,beta,lr", [("dpo", 0.1, 2e-3), ("ipo", 0.1, 2e-3), ("simpo", 2.0, 2e-3)])
def test_preference_optimisation_raises_heldout_margin(tok, kind, beta, lr):
    train, _ = encode_pairs(tok, list(enumerate(preference_pairs(32, 0), 1)), 64)
    val, _ = encode_pairs(tok, list(enumerate(preference_pairs(16, 1), 1)), 64)
    model = tiny_model(tok.get_vocab_size())
    pad = pad_id(tok)
    ref, counts = reference_logps(model, train, pad)
    ref_val, _ = reference_logps(model, val, pad)
    before = heldout_metrics(model, val, ref_val, pad, beta)
    assert before["reward_margin"] == 0 and before["reward_accuracy"] == 0.5
    history = optimize(model, train, ref, counts, pad, DPOConfig(loss=kind, beta=beta, steps=15, batch_size=8, lr=lr))
    after = heldout_metrics(model, val, ref_val, pad, beta)
    assert after["logp_margin"] > before["logp_margin"] + 1.0      # chosen-vs-rejected margin on held-out pairs
    assert after["reward_accuracy"] >= 0.9
    assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy"} <= set(history[-1])


def test_dpo_step_with_lora(tmp_path):
    run, _ = make_run(tmp_path)
    instruct.run_step(run, {"seed": 0})
    stats = dpo.run_step(run, {"seed": 0, "steps": 6, "lr": 1e-3, "lora_rank": 4, "max_pairs": 24, "max_new_tokens": 8})
    assert stats["init"].endswith("pretrain/final")   # no SFT model in this run: falls back
    assert stats["train_pairs"] >= 20   # on-policy: each task's reference over the untrained model's own mistake
    assert stats["heldout_after"]["reward_margin"] > stats["heldout_before"]["reward_margin"]
    assert (run / "dpo" / "final" / "model.safetensors").exists() and not (run / "dpo" / "ckpt").exists()
    from quark.config import ConfigError
    with pytest.raises(ConfigError, match="beta"):
        dpo.validate_config({"beta": 0})
    with pytest.raises(ConfigError, match="loss"):
        dpo.validate_config({"loss": "kto"})
    with pytest.raises(ConfigError, match="samples"):
        dpo.validate_config({"samples": 1})


def test_dpo_on_an_hf_checkpoint_with_its_own_template(tmp_path):
    """Pairs encoded with a Hugging Face checkpoint's chat template (RunDir.chat): the response mask
    covers exactly the answer and the template's end of turn, and DPO raises the held-out margin."""
    pytest.importorskip("transformers")
    from quark.model.io import load_model
    from quark.rundir import RunDir
    from tests.hf_helpers import make_hf_model
    make_hf_model(tmp_path, "qwen3", max_position_embeddings=128)
    chat = RunDir(tmp_path).chat(tmp_path)
    pairs = preference_pairs(24, 0)
    enc, _ = encode_pairs(chat, list(enumerate(pairs, 1)), 128)
    ids, mask = enc[0][0], enc[0][1]
    assert chat.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == \
        pairs[0]["chosen"].strip() + "<|im_end|>\n"
    train, val = enc[:16], enc[16:]
    model, pad = load_model(tmp_path), pad_id(chat)
    ref, counts = reference_logps(model, train, pad)
    ref_val, _ = reference_logps(model, val, pad)
    before = heldout_metrics(model, val, ref_val, pad, 0.1)
    optimize(model, train, ref, counts, pad, DPOConfig(steps=10, batch_size=8, lr=2e-3))
    assert heldout_metrics(model, val, ref_val, pad, 0.1)["logp_margin"] > before["logp_margin"] + 1.0


def test_dpo_learns_from_feedback_collected_by_the_server(tmp_path):
    """Thumbs-down replies with corrections posted to a real server become pairs that quark dpo trains on:
    the trained model prefers the users' corrections over the replies they corrected, far more than the
    same run without the feedback does."""
    import httpx

    from quark.align.pairs import encode_answer, sequence_logps
    from quark.feedback import FeedbackStore
    from quark.infer.engine import Engine
    from quark.model.io import load_model
    from quark.serve.server import create_app
    from tests.serve_helpers import ServerThread

    run, tok = make_run(tmp_path)
    instruct.run_step(run, {"seed": 0})
    model = load_model(run / "pretrain" / "final")
    store = FeedbackStore(run / "feedback" / "feedback.sqlite")
    questions = [f"What does {w} return?" for w in ("len", "sorted", "max", "min", "sum", "abs", "str", "int")]
    with ServerThread(create_app(Engine(model, tok, max_batch=2), tok, "tiny", feedback=store)) as s:
        for q in questions:
            messages = [{"role": "user", "content": q}]
            reply = httpx.post(s.url + "/v1/chat/completions", timeout=60,
                               json={"messages": messages, "max_tokens": 8, "temperature": 0}).json()
            text = reply["choices"][0]["message"]["content"]
            r = httpx.post(s.url + "/v1/feedback", json={"messages": messages, "response": text or "?", "rating": "down",
                                                         "correction": "It returns a value.", "response_id": reply["id"]})
            assert r.status_code == 200
    pairs = store.preference_pairs()
    assert len(pairs) == len(questions)

    def margin(m):   # mean log-prob of the correction minus that of the corrected reply
        total = 0.0
        for p in pairs:
            c = encode_answer(tok, p["prompt"], p["chosen"])
            r = encode_answer(tok, p["prompt"], p["rejected"])
            lc, _ = sequence_logps(m, torch.tensor([c[0]]), torch.tensor([c[1]], dtype=torch.float32))
            lr, _ = sequence_logps(m, torch.tensor([r[0]]), torch.tensor([r[1]], dtype=torch.float32))
            total += float(lc - lr)
        return total / len(pairs)

    base = dpo.run_step(run, {"seed": 0, "steps": 12, "lr": 1e-3, "max_pairs": 8, "safety_pairs": 0, "negatives": "instruct"})
    with torch.no_grad():
        without = margin(load_model(run / "dpo" / "final"))
    with_feedback = dpo.run_step(run, {"seed": 0, "steps": 12, "lr": 1e-3, "max_pairs": 8, "safety_pairs": 0,
                                       "negatives": "instruct", "feedback": "feedback/feedback.sqlite"})
    assert with_feedback["train_pairs"] == base["train_pairs"] + len(questions)
    with torch.no_grad():
        before, after = margin(model), margin(load_model(run / "dpo" / "final"))
    assert after > max(before, without) + 5.0   # nats: the same DPO run without the feedback moves it far less
    with pytest.raises(ValueError, match="does not exist"):
        dpo.run_step(run, {"steps": 1, "feedback": "feedback/missing.sqlite"})
