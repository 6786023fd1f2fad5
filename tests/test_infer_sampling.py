"""Sampler: parameter validation, each logit processor, seeded reproducibility, and the
incremental detokenizer (UTF-8 hold-back, stop strings)."""
import pytest
import torch

from quark.infer.sampling import MIN_SCALE, Detokenizer, SamplingParams, apply_penalties, probs, sample
from tests.serve_helpers import make_tokenizer


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("max_tokens", 1.5), ("temperature", -1),
                                         ("top_k", -1), ("top_p", 0), ("top_p", 1.5), ("repetition_penalty", 0),
                                         ("presence_penalty", 3), ("stop", [""]), ("stop", ["a"] * 5), ("seed", "x"),
                                         ("temperature", True), ("temperature", 1e-40), ("repetition_penalty", 1e-40),
                                         ("temperature", float("nan")), ("seed", 2 ** 64), ("seed", -2 ** 63 - 1),
                                         ("stop", ["x" * 257])])
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_processed_distribution_is_valid_for_extreme_inputs():
    """Before, temperature or repetition_penalty 1e-40 overflowed the logits to inf and NaN, and
    torch.multinomial raised inside the engine step."""
    logits = torch.tensor([90.0, 89.0, float("nan"), float("-inf"), 3e38, -3e38, 5.0])
    history = torch.tensor([0, 1, 4, 6])
    for t, rp in [(MIN_SCALE, MIN_SCALE), (MIN_SCALE, 10.0), (100.0, MIN_SCALE), (1.0, 1.0)]:
        p = SamplingParams(temperature=t, repetition_penalty=rp, presence_penalty=2, frequency_penalty=-2, top_p=0.5)
        for h in (None, history):
            q = probs(logits, p, h)
            assert torch.isfinite(q).all() and abs(float(q.sum()) - 1) < 1e-5 and q[2] == 0 and q[3] == 0
            assert sample(logits, p, h, torch.Generator().manual_seed(0)) not in (2, 3)
    p = SamplingParams(temperature=1.0)
    p.temperature = 1e-40   # what main let through: now just greedy, never NaN
    assert probs(torch.tensor([1.0, 2.0, 0.5]), p).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="no finite logit"):
        sample(torch.full((5,), float("nan")), SamplingParams(temperature=1.0))


def test_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n").stop == ["\n"]


def test_greedy_is_argmax_and_one_hot():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    p = SamplingParams(temperature=0)
    assert sample(logits, p) == 1
    assert probs(logits, p).tolist() == [0, 1, 0, 0]


def test_top_k_keeps_only_k_tokens():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = probs(logits, SamplingParams(temperature=1.0, top_k=5))
    assert (p > 0).sum() == 5
    assert set(torch.nonzero(p).flatten().tolist()) == set(torch.topk(logits, 5).indices.tolist())
    assert p.sum().item() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert (probs(logits, SamplingParams(top_p=0.7)) > 0).tolist() == [True, True, False, False]
    assert (probs(logits, SamplingParams(top_p=0.8)) > 0).tolist() == [True, True, False, False]
    assert (probs(logits, SamplingParams(top_p=0.81)) > 0).tolist() == [True, True, True, False]
    assert (probs(logits, SamplingParams(top_p=0.1)) > 0).tolist() == [True, False, False, False]


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([1.0, 2.0, 3.0])
    cold, hot = probs(logits, SamplingParams(temperature=0.5)), probs(logits, SamplingParams(temperature=2.0))
    assert cold[2] > torch.softmax(logits, -1)[2] > hot[2]


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    hist = torch.tensor([0, 1, 0])
    out = apply_penalties(logits, hist, SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    out = apply_penalties(logits, hist, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [2.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 1.0, 0.5]
    # a greedy pick that repeats flips once penalized
    assert sample(torch.tensor([2.0, 1.9]), SamplingParams(temperature=0, repetition_penalty=1.5), torch.tensor([0])) == 1


def test_seed_reproducible_and_distribution_follows_probs():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    p = SamplingParams(temperature=1.0, seed=7)
    a = [sample(logits, p, generator=g) for g in [p.generator()] for _ in range(50)]
    b = [sample(logits, p, generator=g) for g in [p.generator()] for _ in range(50)]
    assert a == b
    g = p.generator()
    counts = torch.bincount(torch.tensor([sample(logits, p, generator=g) for _ in range(3000)]), minlength=3) / 3000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.04)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_detokenizer_streams_the_same_text(tok):
    text = "Ünïcödé text: naïve café, 東京, emoji 🙂."
    ids = tok.encode(text).ids
    d = Detokenizer(tok)
    deltas = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in x for x in deltas)   # partial UTF-8 sequences are held back


def test_detokenizer_stop_string_cut_and_hold_back(tok):
    ids = tok.encode("Hello world, this is Quark").ids
    d = Detokenizer(tok, stop=["this is"])
    deltas = []
    for i in ids:
        deltas.append(d.add(i))
        if d.stopped:
            break
    assert d.stopped and "".join(deltas) == "Hello world, "
    assert not any("this" in x for x in deltas)   # never sent, then retracted


def test_detokenizer_holds_back_a_character_split_across_byte_tokens():
    """A byte-level BPE trained on ASCII only: every byte of a multi-byte character is its own token, so
    each character arrives in 2-4 pieces; only whole characters are sent, and the text equals decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["plain ascii text, nothing more"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    text = "ascii é 東京 🙂 end"
    ids = tok.encode(text).ids
    assert len(ids) > len(text) and sum(tok.decode([i]) == "\ufffd" for i in ids) >= 9   # split characters
    d = Detokenizer(tok)
    deltas = [d.add(i) for i in ids]
    assert all("\ufffd" not in x for x in deltas) and "".join(deltas) + d.flush() == tok.decode(ids) == text
    assert deltas[ids.index(tok.encode("🙂").ids[0]):][:4] == ["", "", "", "🙂"]   # held until its 4th byte
