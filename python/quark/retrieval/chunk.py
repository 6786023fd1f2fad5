"""Token-aware chunking with overlap.

A document is cut into windows of at most `max_tokens` tokens of the run's tokenizer, consecutive
windows sharing `overlap` tokens so a sentence cut at a boundary is still whole in one of them.
Windows are mapped back to character spans through the tokenizer's offsets, so every chunk is an
exact substring of the document (citations can point into the original text). Subword tokens would
cut words in half at window edges, so a window end is pulled back to the last line or sentence break
in its final quarter (else the last word end), and a window start is moved back to a word start:
chunks stay readable and change size by at most a quarter.
"""
import re
from dataclasses import dataclass

_WORD = re.compile(r"\S+")


@dataclass
class Chunk:
    text: str
    start: int      # character offsets into the document: text == doc[start:end]
    end: int
    n_tokens: int


def token_spans(text, tokenizer=None):
    """-> [(start, end)] character span of each token. `tokenizer` is a tokenizers.Tokenizer (its
    offsets are used) or None for whitespace-separated words."""
    if tokenizer is None:
        return [m.span() for m in _WORD.finditer(text)]
    enc = tokenizer.encode(text, add_special_tokens=False)
    spans = [(s, e) for s, e in enc.offsets if e > s]
    # Byte-level BPE can split one character over several tokens that share its offsets; keep one.
    out = []
    for s, e in spans:
        if out and s < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def chunk_text(text, tokenizer=None, max_tokens=128, overlap=32):
    """Split `text` into overlapping token windows -> list[Chunk] (empty for blank text)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not 0 <= overlap < max_tokens:
        raise ValueError(f"overlap must be in [0, max_tokens), got overlap={overlap} max_tokens={max_tokens}")
    spans = token_spans(text, tokenizer)
    chunks, i, n = [], 0, len(spans)
    while i < n:
        j = min(i + max_tokens, n)
        if j < n:
            j = _soft_end(text, spans, i, j, max_tokens)
        start, end = spans[i][0], spans[j - 1][1]
        while start < end and text[start].isspace():   # byte-level BPE folds the leading space in
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        chunks.append(Chunk(text[start:end], start, end, j - i))
        if j >= n:
            break
        nxt = max(j - overlap, i + 1)
        back = nxt
        while back > i + 1 and back > nxt - max(1, max_tokens // 4) and not _word_start(text, spans, back):
            back -= 1
        i = back if _word_start(text, spans, back) else nxt
    return chunks


def _word_start(text, spans, t):
    s = spans[t][0]
    return s == 0 or not (text[s - 1].isalnum() and text[s].isalnum())


def _word_end(text, spans, t):
    e = spans[t][1]
    return e >= len(text) or not (text[e - 1].isalnum() and text[e].isalnum())


def _soft_end(text, spans, i, j, max_tokens):
    """Pull window end j back to just after a line or sentence break (else a word end) within its
    last quarter."""
    lo = max(i + 1, j - max(1, max_tokens // 4))
    for t in range(j - 1, lo - 1, -1):
        e = spans[t][1]
        if "\n" in text[e:spans[t + 1][1]] or (text[e - 1] in ".!?" and text[e:e + 1].isspace()):
            return t + 1
    for t in range(j - 1, lo - 1, -1):
        if _word_end(text, spans, t):
            return t + 1
    return j
