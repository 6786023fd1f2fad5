"""`quark chat`: an interactive chat in the terminal with a run's latest model (or a model
directory), streaming each reply. /reset starts over, an empty line or EOF quits.

A reply may use all the context the prompt leaves (or --max-tokens, if less). When the conversation
fills the context, the oldest turns are dropped (the system message stays) until a quarter of the
context is free for the reply, so a chat goes on for any number of turns."""
import sys

from quark.chat import chat_format
from quark.serve.generate import add_sampling_args, sampling_params


def configure_parser(p):
    p.add_argument("path", help="a run directory (uses its latest model) or a model directory")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    add_sampling_args(p, max_tokens=None, max_tokens_help="most tokens per reply (None: what fits in the context)")


def fit(chat, messages, ctx):
    """Drops the oldest user/assistant turns (never the system message or the newest message) until the
    prompt leaves a quarter of the context `ctx` for the reply -> (prompt ids, kept messages)."""
    head = 1 if messages[0]["role"] == "system" else 0
    while True:
        ids, _ = chat.encode(messages, add_generation_prompt=True)
        if ctx - len(ids) >= ctx // 4 or len(messages) - head < 3:
            return ids, messages
        messages = messages[:head] + messages[head + 2:]   # one user message and its reply


def run_cli(args):
    from quark.infer.engine import Engine, load_for_serving
    try:   # the reply's budget is set per turn: --max-tokens or what the prompt leaves, whichever is less
        params = sampling_params(args, max_tokens=1 if args.max_tokens is None else args.max_tokens)
        model, tok, model_dir, _ = load_for_serving(args.path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chat = chat_format(tok, model_dir)   # the checkpoint's own template and eos ids, else Quark's
    engine = Engine(model, tok, max_batch=1, cache_dtype=args.cache_dtype, stop_ids=chat.stop_ids).start()
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    print(f"chatting with {model_dir} (/reset to start over, empty line to quit)", file=sys.stderr)
    try:
        while True:
            print("you> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                return 0
            if line.strip() == "/reset":
                messages = list(opening)
                continue
            ids, messages = fit(chat, messages + [{"role": "user", "content": line.rstrip("\n")}], engine.max_seq_len)
            room = engine.max_seq_len - len(ids)
            if room < 1:
                print(f"[this message and the system message take {len(ids)} tokens; the model's context is "
                      f"{engine.max_seq_len}: send a shorter one]", file=sys.stderr)
                messages.pop()
                continue
            params.max_tokens = min(args.max_tokens or room, room)
            print("assistant> ", end="", flush=True)
            req = engine.generate(ids, params, on_event=lambda kind, v: print(v, end="", flush=True) if kind == "token" else None)
            print()
            messages.append({"role": "assistant", "content": req.text})
    finally:
        engine.shutdown(drain=False)
