import pytest
from tests.retrieval_helpers import CORPUS, tiny_tokenizer

from quark.retrieval.chunk import chunk_text, token_spans


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("max_tokens,overlap", [(8, 0), (16, 4), (33, 10), (500, 0)])
def test_chunks_are_substrings_within_budget_and_cover_text(tok, max_tokens, overlap):
    text = "\n".join(CORPUS.values())
    chunks = chunk_text(text, tok, max_tokens, overlap)
    assert chunks
    for c in chunks:
        assert c.text == text[c.start:c.end] and c.text.strip() == c.text
        assert 1 <= c.n_tokens <= max_tokens
        # Alone, a chunk loses its leading space and may tokenise a little differently, never wildly.
        assert len(tok.encode(c.text, add_special_tokens=False).ids) <= 2 * max_tokens
    covered = set()
    for c in chunks:
        covered.update(range(c.start, c.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())


def test_overlap_repeats_the_edge_tokens(tok):
    text = CORPUS["hnsw"] + " " + CORPUS["python"]
    chunks = chunk_text(text, tok, 20, 6)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "consecutive chunks must overlap"
        assert b.start > a.start


def test_word_mode_and_breaks():
    text = "a b c d e f g.\nh i j k l m"
    assert [text[s:e] for s, e in token_spans(text)][5:8] == ["f", "g.", "h"]
    chunks = chunk_text(text, None, 8, 1)
    assert chunks[0].text == "a b c d e f g."     # pulled back to the line break
    assert chunk_text("   \n ", None) == []


def test_bad_settings():
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("a b c", None, 4, 4)
    with pytest.raises(ValueError, match="max_tokens"):
        chunk_text("a b c", None, 0, 0)
