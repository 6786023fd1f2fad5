"""The `quark` command. Each step of the life cycle registers one subcommand here; its module
provides configure_parser(parser) and run_cli(args) -> exit code, and is imported only when run,
so `quark --help` stays fast."""
import argparse
import importlib
import sys

COMMANDS = {
    # name -> (module, one-line help), in life-cycle order
    "info": ("quark._runtime", "version, CPU features, kernel dispatch paths, threads, GPU stack"),
    "run": ("quark.pipeline", "run a recipe end to end (default: the embedded default recipe)"),
    "plan": ("quark.train.plan", "scope a pretraining run: params, FLOPs, memory, tokens, time; pick an architecture"),
    "crawl": ("quark.data.crawl", "crawl web pages into run_dir/crawl (default: the local pydoc server)"),
    "scrape": ("quark.data.repos", "collect code files from git repositories / directories into run_dir/scrape"),
    "clean": ("quark.data.clean", "quality filters (Gopher, C4, FineWeb, code) and PII scrubbing -> run_dir/clean"),
    "dedup": ("quark.data.dedup", "exact and MinHash-LSH near-duplicate removal -> run_dir/dedup"),
    "tokenizer": ("quark.data.tokenizer", "train a byte-level BPE tokenizer -> run_dir/tokenizer/tokenizer.json"),
    "pack": ("quark.data.pack", "tokenize into memory-mapped train/val token files -> run_dir/pack"),
    "pretrain": ("quark.train.trainer", "pretrain a model on a run directory's packed tokens (resumable, DDP/FSDP2)"),
    "instruct-data": ("quark.tune.instruct", "build instruction/response chat data from the run's corpus (+ self-instruct)"),
    "sft": ("quark.tune.sft", "supervised fine-tuning on chat data: full or LoRA, assistant-only loss, packing"),
    "domain": ("quark.tune.domain", "continued pretraining on a domain corpus with general-corpus replay"),
    "reward": ("quark.align.reward", "train a reward model (Bradley-Terry) on preference pairs"),
    "dpo": ("quark.align.dpo", "preference optimisation: DPO, IPO or SimPO against a frozen reference"),
    "rl": ("quark.align.rl", "online RL with GRPO: a reward model or a rule reward, KL to the reference"),
    "redteam": ("quark.align.redteam", "attack suite against a model + safety filter: success rate before/after alignment"),
    "index": ("quark.retrieval.store", "build a run's hybrid index (SQLite FTS5 + vectors), or search it"),
    "rag": ("quark.retrieval.rag", "answer a question from a run's index with cited sources, or evaluate RAG"),
    "route": ("quark.orchestrate.router", "classify a request's intent and route it to a model or pipeline"),
    "agent": ("quark.orchestrate.agent", "run an agent (the run's chat model + tools) on a task"),
    "quantize": ("quark.optimize.quantize", "quantize a model's Linear layers (int8 / int4 / w8a8) and save it"),
    "distill": ("quark.optimize.distill", "train a smaller student from a teacher's logits (+ a no-teacher control run)"),
    "shard": ("quark.optimize.shard", "reshard a model into HF-style safetensors shards; check tensor-parallel logits"),
    "export": ("quark.export", "write a model as a Hugging Face directory, a LoRA adapter as PEFT, or a GGUF file"),
    "generate": ("quark.serve.generate", "generate text from a run's latest model (or a model directory)"),
    "chat": ("quark.serve.repl", "chat with a model in the terminal, streaming replies"),
    "serve": ("quark.serve.server", "OpenAI-compatible API server with a chat and training-runs web UI"),
    "eval": ("quark.eval.harness", "evaluate a model: perplexity, tasks, code pass@k; --gate fails on regressions"),
    "report": ("quark.eval.report", "write report.html (tables and plots) for a run directory"),
    "registry": ("quark.improve.registry", "model registry: list, show, register, promote through the eval gate"),
    "augment": ("quark.improve.augment", "augment chat data: noise, model paraphrases, code/docstring round trips"),
    "automl": ("quark.improve.automl", "search recipe settings with successive halving over pipeline runs"),
}


def build_parser(chosen=None):
    parser = argparse.ArgumentParser(prog="quark", description="Quark: develop language models end to end.")
    parser.add_argument("--version", dest="show_version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).configure_parser(p)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.show_version:
        import quark
        print(quark.__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    return importlib.import_module(COMMANDS[args.command][0]).run_cli(args) or 0


if __name__ == "__main__":
    sys.exit(main())
