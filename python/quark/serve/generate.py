"""`quark generate`: one completion from a run or model directory, streamed to stdout, with timings
on stderr; `--draft` decodes speculatively with a smaller model that shares the tokenizer."""
import argparse
import sys

from quark.chat import chat_format
from quark.infer.sampling import SamplingParams


def add_sampling_args(p, max_tokens=64, max_tokens_help="most tokens to generate"):
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter   # --help shows each default
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=max_tokens_help)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeated tokens")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--cache-dtype", default="fp32", choices=["fp32", "bf16", "int8"], help="KV cache dtype")


def sampling_params(args, max_tokens=None):
    return SamplingParams(max_tokens=args.max_tokens if max_tokens is None else max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed)


def configure_parser(p):
    p.add_argument("path", help="a run directory (uses its latest model) or a model directory")
    p.add_argument("--prompt", required=True, help="the prompt text ('-' reads stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--draft", default=None, help="a draft model directory for speculative decoding")
    p.add_argument("--draft-k", type=int, default=4, help="draft tokens proposed per target pass")
    add_sampling_args(p)


def run_cli(args):
    from quark.infer.engine import Engine, load_for_serving
    try:
        params = sampling_params(args)
        model, tok, model_dir, _ = load_for_serving(args.path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    chat = chat_format(tok, model_dir)   # the checkpoint's own template and eos ids, else Quark's
    if args.chat:
        ids, _ = chat.encode([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = tok.encode(text, add_special_tokens=False).ids
    stop_ids = chat.stop_ids

    def show(delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    try:
        if args.draft:
            from quark.model.io import load_model
            from quark.infer.speculative import SpeculativeDecoder
            dec = SpeculativeDecoder(model, load_model(args.draft), k=args.draft_k, cache_dtype=args.cache_dtype)
            res = dec.generate(ids, params, tok, stop_ids, on_text=show)
            n, secs = len(res.output_ids), res.seconds
            extra = f", {res.acceptance_rate:.0%} of draft tokens accepted, {res.target_passes} target passes"
        else:
            engine = Engine(model, tok, max_batch=1, cache_dtype=args.cache_dtype, stop_ids=stop_ids)
            req = engine.generate(ids, params, on_event=lambda kind, v: show(v) if kind == "token" else None)
            engine.shutdown()
            n, secs = len(req.output_ids), req.t_done - req.t_submit
            extra = f", first token after {req.ttft * 1e3:.0f} ms"
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print(flush=True)   # the text's newline goes out before the stats line, also when both streams share a pipe
    print(f"[{model_dir}: {len(ids)} prompt tokens, {n} generated in {secs:.2f} s "
          f"({n / max(secs, 1e-9):.1f} tok/s){extra}]", file=sys.stderr)
    return 0
