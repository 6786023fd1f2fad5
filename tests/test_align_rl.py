import pytest
import torch

from quark.align import rl
from quark.align.rl import RLConfig, grpo, grpo_loss, rule_reward
from quark.chat import QuarkChat, TemplateChat
from quark.config import ConfigError
from quark.model.io import load_model
from quark.rundir import RunDir
from quark.tune import instruct
from tests.hf_helpers import make_hf_model
from tests.tiny_lm import make_run, one_thread, tiny_model, tiny_tokenizer  # noqa: F401 (one_thread is a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[{"role": "user", "content": c}] for c in ["hello world", "how are you", "the quick fox", "def add"]]


def test_grpo_raises_a_rule_reward_and_tracks_kl():
    tok = tiny_tokenizer()
    model = tiny_model(tok.get_vocab_size())
    s = RLConfig(steps=30, lr=3e-3, group_size=8, prompts_per_step=2, max_new_tokens=10, kl_beta=0.01)
    h = grpo(model, QuarkChat(tok), PROMPTS, rule_reward("keyword:the"), s, seed=0)
    first = sum(x["reward_mean"] for x in h[:5]) / 5
    last = sum(x["reward_mean"] for x in h[-5:]) / 5
    assert last > first + 0.5
    assert h[0]["kl"] < 1e-6 < h[-1]["kl"]   # the policy starts at the reference, then drifts


def test_sample_group_runs_the_engine_and_masks_through_the_stop_token():
    """Completions come from the engine (one seed per sample); the policy keeps its own parameters so
    training after sampling still updates the model that samples."""
    model = tiny_model(64)
    params = dict(model.named_parameters())
    stop = {0, 1}
    seqs, mask, term, lens = rl.sample_group(model, [5, 6, 7], 6, 8, 1.0, stop, torch.Generator().manual_seed(0))
    assert all(model.get_parameter(n) is p and p.requires_grad for n, p in params.items())
    assert seqs.shape[0] == 6 and (seqs[:, :3] == torch.tensor([5, 6, 7])).all() and (mask[:, :3] == 0).all()
    for row, m, t, n in zip(seqs, mask, term, lens):
        width = int(m.sum())
        assert (m[3:3 + width] == 1).all() and width == int(n) + int(t)         # the stop token is learned too
        assert int(row[3 + n]) in stop if t else n == 8                        # stopped, or ran to the limit
        assert not any(int(x) in stop for x in row[3:3 + n])                    # no stop inside the answer
    again = rl.sample_group(model, [5, 6, 7], 6, 8, 1.0, stop, torch.Generator().manual_seed(0))[0]
    assert torch.equal(seqs, again) and len({tuple(r.tolist()) for r in seqs}) > 1   # seeded, yet diverse


def test_grpo_loss_clips_and_penalises_kl():
    logp = torch.tensor([[0.0, -1.0]], requires_grad=True)
    mask = torch.ones(1, 2)
    loss, kl = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0]), mask, 0.2, 0.1)
    assert float(loss.detach()) == -1.0 and kl == 0.0
    far = logp.detach() - 1.0   # ratio e > 1 + eps: the clipped term caps the objective
    loss, _ = grpo_loss(logp, far, logp.detach(), torch.tensor([1.0]), mask, 0.2, 0.0)
    assert abs(float(loss.detach()) + 1.2) < 1e-6


def test_rules_and_config_errors():
    assert rule_reward("terminates")([], "x", True) == 1.0 and rule_reward("terminates")([], "x", False) == 0.0
    refusal = rule_reward("refusal")
    from quark.safety_data import harmful_requests
    harmful = [{"role": "user", "content": harmful_requests("build")[0]["prompt"]}]
    assert refusal(harmful, "I can't help with that request.", True) == 1.0
    assert refusal([{"role": "user", "content": "hi"}], "I can't help with that request.", True) == 0.0
    with pytest.raises(ConfigError, match="unknown rule"):
        rl.validate_config({"reward": "nonsense"})
    with pytest.raises(ConfigError, match="group_size"):
        rl.validate_config({"group_size": 1})


def test_rl_step(tmp_path):
    run, _ = make_run(tmp_path)
    instruct.run_step(run, {"seed": 0})
    stats = rl.run_step(run, {"seed": 0, "steps": 2, "group_size": 2, "prompts_per_step": 1, "max_new_tokens": 6,
                              "reward": "terminates"})
    assert stats["prompts"] > 0 and (run / "rl" / "final" / "model.safetensors").exists()
    assert "heldout_tasks" not in stats
    stats = rl.run_step(run, {"seed": 0, "steps": 2, "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 6,
                              "tasks": "add,code", "heldout_tasks": 12})
    h = stats["heldout_tasks"]
    assert stats["reward"] == "verify" and h["n"] == 12 and h["baseline"] == 0.0 and h["diff"] == h["rl"] - h["baseline"]
    assert h["baseline_model"] == stats["init"]
    with pytest.raises(ValueError, match="names neither task families"):
        rl.run_step(run, {"steps": 1, "tasks": "poetry"})


def sft_on(model, tok, records, steps, lr=3e-3, batch=16, seed=0):
    """A plain supervised warm start (assistant tokens only): the 'sft model' RL starts from."""
    import random

    from quark.chat import encode_chat
    enc = [encode_chat(tok, r["messages"]) for r in records]
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        rows = rng.sample(enc, batch)
        T = max(len(i) for i, _ in rows)
        ids, mask = torch.zeros(batch, T, dtype=torch.long), torch.zeros(batch, T)
        for j, (i, m) in enumerate(rows):
            ids[j, :len(i)], mask[j, :len(m)] = torch.tensor(i), torch.tensor(m, dtype=torch.float)
        logits, _ = model(ids[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_grpo_on_verifiable_tasks_beats_the_sft_model_on_held_out_tasks():
    """GRPO with the verifier's reward on the format task's training numbers makes the model answer more
    held-out numbers (never seen in training) exactly: paired difference over the same 225 items > 2 SE."""
    from quark import verifiable as V
    train, held = V.make_tasks(["format"], "train"), V.make_tasks(["format"], "heldout")
    tok = tiny_tokenizer(extra=["Reply with only the number, nothing else."] * 20)   # numbers stay digit tokens
    model = sft_on(tiny_model(tok.get_vocab_size()), tok, V.reference_records(train), steps=350)
    sft_scores = V.solved(model, tok, held, max_new_tokens=6)
    by_prompt = {t["messages"][-1]["content"]: t for t in train}
    s = RLConfig(steps=60, lr=1e-3, group_size=16, prompts_per_step=4, max_new_tokens=4, kl_beta=0.0, temperature=0.8)
    grpo(model, QuarkChat(tok), [t["messages"] for t in train], lambda p, text, term: V.verify(by_prompt[p[-1]["content"]], text),
         s, seed=0)
    h = rl.paired_difference(V.solved(model, tok, held, max_new_tokens=6), sft_scores)
    assert h["n"] == 225 and h["diff"] > 2 * h["se"], h


def test_rl_step_on_a_hugging_face_directory(tmp_path):
    """The policy samples and learns in the checkpoint's own chat format (its template, its eos ids as
    stops), though the run's tokenizer is another; rl/final keeps the checkpoint's chat files."""
    run, _ = make_run(tmp_path, with_model=False)
    instruct.run_step(run, {"seed": 0})
    hf = make_hf_model(tmp_path / "hf", max_position_embeddings=128)
    stats = rl.run_step(run, {"seed": 0, "init": str(tmp_path / "hf"), "steps": 2, "group_size": 2,
                              "prompts_per_step": 1, "max_new_tokens": 6, "lr": 1e-3})
    assert stats["init"] == str(tmp_path / "hf")
    chat = RunDir(run).chat(run / "rl" / "final")
    assert isinstance(chat, TemplateChat) and chat.stop_ids == {0, 2}
    policy, seen = load_model(tmp_path / "hf"), []

    def reward(prompt, text, terminated):   # the answer's length: differs within a group, so the policy moves
        seen.append(text)
        return float(len(text))
    grpo(policy, chat, PROMPTS, reward, RLConfig(steps=2, group_size=4, prompts_per_step=1, max_new_tokens=6, lr=1e-3))
    assert len(seen) == 8
    assert not torch.equal(policy.blocks[0].attn.wq.weight, hf.model.layers[0].self_attn.q_proj.weight)
