"""The chat template shared by SFT, serving and tools.

    <|bos|><|system|>You are...<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>

A generation prompt ends with <|assistant|>; generation stops at <|end|> or <|eos|>. Message
contents are encoded separately from the role markers, and any special-token text inside a content
is neutralised, so a user cannot forge a role boundary.

Tools (OpenAI's schema) render as text in this template, in the syntax Hermes/Qwen templates use:
the tool list goes into the system message (one JSON per line inside <tools>...</tools>), an assistant
call is `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` after its content, and a result is a
"tool" message. parse_tool_calls reads calls back out of generated text (also for HF templates that
use this syntax).
"""
import json
import re

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>"]
ROLES = ("system", "user", "assistant", "tool")
STOP_TOKENS = ("<|end|>", "<|eos|>")


def validate_messages(messages, where="messages"):
    """Each message: a role and a string content; an assistant message may instead (or also) carry
    OpenAI tool_calls [{"id", "type": "function", "function": {"name", "arguments": JSON text}}]."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if calls is not None:
            _validate_tool_calls(calls, f"{where}[{i}].tool_calls")
            if m.get("role") != "assistant":
                raise ValueError(f"{where}[{i}]: only assistant messages carry tool_calls")
            if m.get("content") is None:
                continue
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


def _validate_tool_calls(calls, where):
    if not isinstance(calls, list) or not calls:
        raise ValueError(f"{where}: expected a non-empty list")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
            raise ValueError(f"{where}[{j}]: expected {{'type': 'function', 'function': {{'name': str, 'arguments': str}}}}")
        try:
            args = json.loads(fn["arguments"])
        except ValueError:
            raise ValueError(f"{where}[{j}].function.arguments: not valid JSON") from None
        if not isinstance(args, dict):
            raise ValueError(f"{where}[{j}].function.arguments: must encode a JSON object")


def format_tool_call(name, arguments):
    """One call in the template's syntax; arguments: a dict."""
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}</tool_call>"


_TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def parse_tool_calls(text):
    """Generated text -> (content or None, [(name, arguments dict)]): every well-formed
    <tool_call>{"name", "arguments"}</tool_call> block is a call and is cut from the content."""
    calls, kept, end = [], [], 0
    for m in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except ValueError:
            continue
        if isinstance(call, dict) and isinstance(call.get("name"), str) and isinstance(call.get("arguments", {}), dict):
            calls.append((call["name"], call.get("arguments", {})))
            kept.append(text[end:m.start()])
            end = m.end()
    content = ("".join(kept) + text[end:]).strip() if calls else text
    return (content or None), calls


def tools_prompt(tools):
    """The system text that lists OpenAI tools and the call syntax (what with_tools adds; an agent's
    ToolRegistry writes the same, so a model fine-tuned on tool records sees its tools as it learned them)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You can call these functions. To call one, answer with <tool_call>{\"name\": NAME, \"arguments\": "
            f"{{...}}}}</tool_call> (one block per call); results come back as tool messages.\n<tools>\n{listing}\n</tools>")


def with_tools(messages, tools=None):
    """Messages with tools and tool calls written as text (this template's syntax, above): the tool list
    joins the system message (one is added if there is none), calls follow their message's content."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = "".join(format_tool_call(c["function"]["name"], json.loads(c["function"]["arguments"]))
                            for c in m["tool_calls"])
            m = {"role": m["role"], "content": (m.get("content") or "") + calls}
        out.append(m)
    if tools:
        text = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


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
    tools = rec.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"{where}: 'tools' must be a list of OpenAI tool objects")
    if not any(m["role"] == "assistant" for m in rec["messages"]):
        raise ValueError(f"{where}: no assistant message, so nothing to learn")


def encode_chat(tokenizer, messages, add_generation_prompt=False):
    """-> (ids, mask): token ids of the rendered conversation (a tokenizers.Tokenizer) and a 0/1 mask
    that is 1 exactly on assistant content tokens and their closing <|end|> (the SFT loss positions)."""
    validate_messages(messages)
    messages = with_tools(messages)
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
    messages = with_tools(messages)
    text = "<|bos|>" + "".join(f"<|{m['role']}|>{neutralize(m['content'])}<|end|>" for m in messages)
    return text + ("<|assistant|>" if add_generation_prompt else "")


# ---- a checkpoint's own Jinja chat template (Hugging Face directories) ------------------------------

def _plain(value):
    """The data a template may see, rebuilt from plain JSON types (transformers' _plain_template_data)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):   # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _normalize(messages):
    """Drop None-valued keys, parse tool-call arguments (OpenAI sends JSON text) and alias a message's
    reasoning under the names templates read, as transformers' apply_chat_template does before rendering."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"messages[{i}]: each message needs a 'role'")
        m = _plain({k: v for k, v in m.items() if v is not None})
        if isinstance(m.get("tool_calls"), list):   # templates read arguments as a mapping (tojson, items())
            m["tool_calls"] = [c if not isinstance(c.get("function", {}).get("arguments"), str) else
                               {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def compile_template(template):
    """A Jinja template compiled as transformers compiles chat templates: an ImmutableSandboxedEnvironment
    (templates from checkpoints are untrusted code) with trim_blocks, lstrip_blocks, loop controls, the
    {% generation %} tag, and the same tojson, raise_exception, strftime_now, dict and namespace."""
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):   # marks assistant text for masks; renders its body as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):   # no underscore attributes: no way to CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    class Dict:   # dict(...) and dict.fromkeys(...) without the type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=Dict(), namespace=Namespace)
    return env.from_string(template)


class TemplateChat:
    """A checkpoint's chat template (quark.model.hf.chat_settings): the same string as transformers'
    tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=..., tokenize=False), token
    ids as apply_chat_template(tokenize=True) (the rendered text encoded without added special tokens),
    and generation stops at the checkpoint's eos ids."""

    def __init__(self, tokenizer, template, special_tokens=None, eos_ids=()):
        self.tokenizer, self.special_tokens = tokenizer, dict(special_tokens or {})
        self.compiled = compile_template(template)
        eos = self.special_tokens.get("eos_token")
        ids = list(eos_ids) or ([tokenizer.token_to_id(eos)] if eos and tokenizer is not None else [])
        self.stop_ids = frozenset(i for i in ids if i is not None)
        # the end-of-document token (packing text for this model): the tokenizer's eos, else a stop id
        eos_id = tokenizer.token_to_id(eos) if eos and tokenizer is not None else None
        self.eos_id = eos_id if eos_id is not None else min(self.stop_ids, default=None)
        bos = self.special_tokens.get("bos_token")
        self.bos_id = tokenizer.token_to_id(bos) if bos and tokenizer is not None else None
        pad = self.special_tokens.get("pad_token")   # padding is never a target: any id would do
        self.pad_id = (tokenizer.token_to_id(pad) if pad and tokenizer is not None else None) or min(self.stop_ids, default=0)

    def render(self, messages, add_generation_prompt=False, tools=None, **kwargs):
        import jinja2
        try:
            return self.compiled.render(messages=_normalize(messages), tools=_plain(tools), documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **_plain({**self.special_tokens, **kwargs}))
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {e}") from None

    def encode(self, messages, add_generation_prompt=False, tools=None):
        """-> (ids, mask): mask is 1 on the tokens of each assistant turn as the template renders it
        (its content and end-of-turn marker: the text between the prompt up to that turn with a
        generation prompt, and the conversation up to and including it)."""
        text = self.render(messages, add_generation_prompt, tools)
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            prompt = self.render(messages[:i], True, tools) if i else ""
            turn = self.render(messages[:i + 1], False, tools)
            if not (text.startswith(turn) and turn.startswith(prompt)):
                raise ValueError("this chat template renders earlier turns differently in longer conversations, "
                                 "so assistant turns cannot be located for the loss mask")
            spans.append((len(prompt), len(turn)))
        mask = [int(any(s <= a < e for s, e in spans)) for a, _ in enc.offsets]
        return enc.ids, mask


class QuarkChat:
    """Quark's own template (above) behind the same interface as TemplateChat."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ids = [tokenizer.token_to_id(t) for t in STOP_TOKENS] if tokenizer is not None else []
        self.stop_ids = frozenset(i for i in ids if i is not None)
        self.eos_id = tokenizer.token_to_id("<|eos|>") if tokenizer is not None else None
        self.bos_id = tokenizer.token_to_id("<|bos|>") if tokenizer is not None else None
        self.pad_id = tokenizer.token_to_id("<|pad|>") if tokenizer is not None else None

    def render(self, messages, add_generation_prompt=False, tools=None):
        validate_messages(messages)
        return render(with_tools(messages, tools), add_generation_prompt)

    def encode(self, messages, add_generation_prompt=False, tools=None):
        validate_messages(messages)
        return encode_chat(self.tokenizer, with_tools(messages, tools), add_generation_prompt)


def chat_format(tokenizer, model_dir=None):
    """The chat format of a model: its directory's own template (a Hugging Face checkpoint, or a model
    fine-tuned from one, which keeps the files), else Quark's."""
    if model_dir is not None:
        from quark.model.hf import chat_settings
        settings = chat_settings(model_dir)
        if settings is not None:
            return TemplateChat(tokenizer, settings["template"], settings["special_tokens"], settings["eos_ids"])
    return QuarkChat(tokenizer)
