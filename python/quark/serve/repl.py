"""`quark chat`: an interactive chat in the terminal with a run's latest model (or a model
directory), streaming each reply. /reset starts over, an empty line or EOF quits."""
import sys

from quark.chat import chat_format
from quark.serve.generate import add_sampling_args, sampling_params


def configure_parser(p):
    p.add_argument("path", help="a run directory (uses its latest model) or a model directory")
    p.add_argument("--system", default=None, help="a system message opening the conversation")
    add_sampling_args(p)
    p.set_defaults(max_tokens=256)


def run_cli(args):
    from quark.infer.engine import Engine, load_for_serving
    try:
        params = sampling_params(args)
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
            messages.append({"role": "user", "content": line.rstrip("\n")})
            ids, _ = chat.encode(messages, add_generation_prompt=True)
            room = engine.max_seq_len - len(ids)
            if room < 1:
                print("[the conversation fills the model's context: /reset to start over]", file=sys.stderr)
                messages.pop()
                continue
            params.max_tokens = min(args.max_tokens, room)
            print("assistant> ", end="", flush=True)
            req = engine.generate(ids, params, on_event=lambda kind, v: print(v, end="", flush=True) if kind == "token" else None)
            print()
            messages.append({"role": "assistant", "content": req.text})
    finally:
        engine.shutdown(drain=False)
