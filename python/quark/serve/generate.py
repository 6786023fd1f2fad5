"""`quark generate`: one completion from a run or model directory, streamed to stdout, with timings
on stderr; `--draft DIR` decodes speculatively with a smaller model that shares the tokenizer,
`--prompt-lookup` with proposals copied from the prompt (both also on `quark serve`)."""
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
    add_speculation_args(p)
    add_sampling_args(p)


def add_speculation_args(p):
    p.add_argument("--draft", default=None, metavar="DIR",
                   help="speculative decoding with this draft model directory (it must share the tokenizer)")
    p.add_argument("--prompt-lookup", action="store_true",
                   help="speculative decoding without a draft model: propose the continuation of the last n-gram's "
                        "latest earlier occurrence in the prompt and output")
    p.add_argument("--draft-k", type=int, default=4, help="tokens proposed per round of speculative decoding")


def speculation(args):
    """The Engine's speculative decoding arguments from the CLI flags (loads the draft model)."""
    from quark.model.io import load_model
    if args.draft and args.prompt_lookup:
        raise ValueError("--draft and --prompt-lookup exclude each other: choose one proposer")
    return {"draft": load_model(args.draft) if args.draft else None, "prompt_lookup": args.prompt_lookup,
            "spec_k": args.draft_k}


def run_cli(args):
    from quark.infer.engine import Engine, load_for_serving
    try:
        params = sampling_params(args)
        model, tok, model_dir, _ = load_for_serving(args.path)
        spec = speculation(args)
        chat = chat_format(tok, model_dir)   # the checkpoint's own template and eos ids, else Quark's
        engine = Engine(model, tok, max_batch=1, cache_dtype=args.cache_dtype, stop_ids=chat.stop_ids, **spec)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.chat:
        ids, _ = chat.encode([{"role": "user", "content": text}], add_generation_prompt=True)
    else:
        ids = tok.encode(text, add_special_tokens=False).ids

    def show(delta):
        sys.stdout.write(delta)
        sys.stdout.flush()

    try:
        req = engine.generate(ids, params, on_event=lambda kind, v: show(v) if kind == "token" else None)
        engine.shutdown()
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print(flush=True)   # the text's newline goes out before the stats line, also when both streams share a pipe
    n, secs = len(req.output_ids), req.t_done - req.t_submit
    extra = f", first token after {req.ttft * 1e3:.0f} ms"
    if engine.speculator is not None:
        extra += (f", {engine.spec_accepted / max(engine.spec_proposed, 1):.0%} of {engine.spec_proposed} proposed "
                  f"tokens accepted, {engine.steps} decode passes")
    print(f"[{model_dir}: {len(ids)} prompt tokens, {n} generated in {secs:.2f} s "
          f"({n / max(secs, 1e-9):.1f} tok/s){extra}]", file=sys.stderr)
    return 0
