"""The chat template shared by SFT, serving and tools.

    <|bos|><|system|>You are...<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

A generation prompt ends with <|assistant|>; generation stops at <|end|> or <|eos|>. Message
contents are encoded separately from the role markers, and any special-token text inside a content
is neutralised, so a user cannot forge a role boundary.
"""
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
ROLES = ("system", "user", "assistant", "tool")
STOP_TOKENS = ("<|end|>", "<|eos|>")


def validate_messages(messages, where="messages"):
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}[{i}]: each message needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}[{i}]: role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}[{i}]: content must be a string")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}[{i}]: content is not valid Unicode (it holds a lone surrogate)") from None


def neutralize(text):
    """Break special-token text inside a content so it encodes as ordinary characters."""
    return text.replace("<|", "<\u200b|")


def special_ids(tokenizer):
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks the chat special tokens {missing}; train it with quark.data.tokenizer")
    return ids


def check_chat_record(rec, where):
    """Raise ValueError naming `where` (path:line) unless rec is a well-formed chat record."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "messages" not in rec:
        raise ValueError(f"{where}: missing field 'messages'")
    try:
        validate_messages(rec["messages"], where="messages")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not any(m["role"] == "assistant" for m in rec["messages"]):
        raise ValueError(f"{where}: no assistant message, so nothing to learn")


def encode_chat(tokenizer, messages, add_generation_prompt=False):
    """-> (ids, mask): token ids of the rendered conversation (a tokenizers.Tokenizer) and a 0/1 mask
    that is 1 exactly on assistant content tokens and their closing <|end|> (the SFT loss positions)."""
    validate_messages(messages)
    sp = special_ids(tokenizer)
    ids, mask = [sp["<|bos|>"]], [0]
    # one encode_batch: it releases the GIL (encode does not), so a server stays responsive meanwhile
    bodies = tokenizer.encode_batch([neutralize(m["content"]) for m in messages], add_special_tokens=False)
    for m, body in zip(messages, (b.ids for b in bodies)):
        learn = 1 if m["role"] == "assistant" else 0
        ids += [sp[f"<|{m['role']}|>"]] + body + [sp["<|end|>"]]
        mask += [0] + [learn] * len(body) + [learn]
    if add_generation_prompt:
        ids.append(sp["<|assistant|>"])
        mask.append(0)
    return ids, mask


def render(messages, add_generation_prompt=False):
    """The template as text (for display and logs)."""
    validate_messages(messages)
    text = "<|bos|>" + "".join(f"<|{m['role']}|>{neutralize(m['content'])}<|end|>" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")
