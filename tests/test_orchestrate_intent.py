import numpy as np
import pytest
from tests.orchestrate_data import OUT_OF_SCOPE, intent_data
from tests.retrieval_helpers import tiny_model, tiny_tokenizer

from quark.orchestrate.intent import UNKNOWN, IntentClassifier, expected_calibration_error
from quark.retrieval.embed import HashingEmbedder, QuarkEmbedder


def test_ece():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    assert expected_calibration_error(probs, [0, 0, 0, 1]) == pytest.approx(0.5 * 0.1 + 0.5 * 0.1)
    assert expected_calibration_error(np.array([[1.0, 0.0]]), [0]) == 0.0


def test_classifier_accuracy_calibration_and_unknown(tmp_path):
    texts, intents = intent_data()
    clf = IntentClassifier(HashingEmbedder(dim=256))
    rep = clf.fit(texts, intents, seed=0)
    assert rep["val_accuracy"] >= 0.9 and rep["labels"] == ["code", "search", "weather"]
    assert rep["ece_after"] <= rep["ece_before"] + 1e-6           # temperature scaling never hurts NLL-calibration here
    assert 0 < rep["threshold"] < 1 and rep["val_unknown_rejected"] >= 0.5
    preds = clf.predict(["will it rain in Berlin tomorrow", "search the docs for quantization", "write code that adds numbers"])
    assert [p.intent for p in preds] == ["weather", "search", "code"]
    assert all(abs(sum(p.probs.values()) - 1) < 1e-5 for p in preds)
    odd = clf.predict(["sing me a song about the sea", "buy two tickets to the opera"])
    assert sum(p.intent == UNKNOWN for p in odd) >= 1
    assert all(p.confidence < preds[0].confidence for p in odd)
    clf.save(tmp_path / "clf")
    again = IntentClassifier.load(tmp_path / "clf", HashingEmbedder(dim=256))
    assert [p.intent for p in again.predict(["forecast for Rome this week"])] == ["weather"]
    with pytest.raises(ValueError, match="embedder"):
        IntentClassifier.load(tmp_path / "clf", HashingEmbedder(dim=128))


def test_fixed_threshold_and_bad_input():
    texts, intents = intent_data()
    keep = [i for i, t in enumerate(intents) if t != "unknown"]
    clf = IntentClassifier(HashingEmbedder(dim=256))
    clf.fit([texts[i] for i in keep], [intents[i] for i in keep], threshold=0.99)
    assert clf.threshold == 0.99
    assert all(p.intent in (UNKNOWN, p.label) for p in clf.predict(OUT_OF_SCOPE))
    with pytest.raises(ValueError, match="two intents"):
        IntentClassifier(HashingEmbedder()).fit(["a", "b"], ["x", "unknown"])
    with pytest.raises(RuntimeError, match="not trained"):
        IntentClassifier(HashingEmbedder()).predict(["a"])


def test_on_quark_model_embeddings():
    tok = tiny_tokenizer()
    texts, intents = intent_data()
    clf = IntentClassifier(QuarkEmbedder(tiny_model(tok.get_vocab_size(), d_model=64), tok, name="tiny"))
    rep = clf.fit(texts, intents)
    assert rep["val_accuracy"] >= 0.6     # a random 1-layer model still separates the templates' words
