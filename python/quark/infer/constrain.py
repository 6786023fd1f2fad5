"""Constrained decoding: a grammar (a JSON schema, any JSON object, or forced tool calls) masks each
step's logits to the tokens that keep the output inside it, so even a random model's output parses.

Grammars run on llguidance (Moskal et al., Microsoft): chosen over xgrammar by a quick measurement on
a byte-level BPE vocabulary (grammar compile ~1 ms vs ~4 ms, per-token mask ~0.025 ms vs ~0.045 ms
median), and it reads a tokenizers.Tokenizer's JSON directly (no transformers wrapper), ships as one
wheel without dependencies, and its Lark grammars embed JSON schemas (%json), which the tool-call
grammar needs. JSON is generated compact (no free whitespace): a model cannot pad it forever.

    c = Constraint.json_schema(tokenizer, schema, eos_id)   # ValueError names what is wrong
    engine.submit(ids, params, processor=c)                  # the engine calls c(output_ids, logits)
"""
import functools
import json

COMPACT = {"whitespace_flexible": False}


@functools.lru_cache(maxsize=8)
def _lltokenizer(tokenizer_json, vocab_size, eos_id):
    import llguidance
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_id)


def lltokenizer(tokenizer, vocab_size, eos_id):
    """The grammar library's view of a tokenizers.Tokenizer (cached: building it reads the whole vocabulary).
    vocab_size: the model's (its embedding may be padded past the tokenizer's)."""
    return _lltokenizer(tokenizer.to_str(), vocab_size, eos_id)


def json_schema_grammar(schema):
    import llguidance
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=COMPACT)


def tool_call_grammar(tools, max_calls=1):
    """1..max_calls blocks <tool_call>{"name": NAME, "arguments": {...}}</tool_call>, each one of tools
    (a list of {"name", "parameters"}) with arguments that satisfy that tool's parameter schema; the
    syntax quark.chat.parse_tool_calls reads back."""
    import llguidance
    rules = []
    for i, t in enumerate(tools):
        body = {"type": "object", "properties": {"name": {"const": t["name"]},
                                                 "arguments": t.get("parameters") or {"type": "object"}},
                "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": COMPACT}
        rules.append(f"fn{i}: %json {json.dumps(body)}")
    alts = " | ".join(f"fn{i}" for i in range(len(tools)))
    lark = "\n".join([f"start: call{{1,{max_calls}}}", f'call: "<tool_call>" ({alts}) "</tool_call>"', *rules])
    return llguidance.LLMatcher.grammar_from_lark(lark)


class Constraint:
    """A per-request logits processor: masks logits (V,) to the grammar's allowed next tokens. It feeds
    the matcher the tokens generated since its last call, so it needs nothing but the output so far."""

    def __init__(self, tokenizer, grammar, eos_id, vocab_size=None):
        import llguidance
        import llguidance.torch as llt
        lltok = lltokenizer(tokenizer, vocab_size or tokenizer.get_vocab_size(), eos_id)
        error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
        if error:
            raise ValueError(error)
        self.matcher = llguidance.LLMatcher(lltok, grammar)
        if self.matcher.is_error():   # e.g. a schema no value satisfies
            raise ValueError(self.matcher.get_error())
        self.llt = llt
        self.mask = llt.allocate_token_bitmask(1, lltok.vocab_size)
        self.seen = 0

    @classmethod
    def json_schema(cls, tokenizer, schema, eos_id, vocab_size=None):
        return cls(tokenizer, json_schema_grammar(schema), eos_id, vocab_size)

    @classmethod
    def tool_calls(cls, tokenizer, tools, eos_id, vocab_size=None, max_calls=1):
        return cls(tokenizer, tool_call_grammar(tools, max_calls), eos_id, vocab_size)

    def __call__(self, output_ids, logits):
        """output_ids: the request's tokens so far; logits (V,) -> a masked copy (V,) float32."""
        for t in output_ids[self.seen:]:
            if not self.matcher.consume_token(t):
                raise ValueError(f"token {t} breaks the grammar: {self.matcher.get_error()}")
        self.seen = len(output_ids)
        self.llt.fill_next_token_bitmask(self.matcher, self.mask, 0)
        out = logits.float().clone()[None]                                       # (1, V)
        self.llt.apply_token_bitmask_inplace(out, self.mask)
        return out[0]
