"""The `quark` command. Each step of the life cycle registers one subcommand here; its module
provides configure_parser(parser) and run_cli(args) -> exit code, and is imported only when run,
so `quark --help` stays fast."""
import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "info": ("quark._runtime", "version, CPU features, kernel dispatch paths, threads, GPU stack"),
    "run": ("quark.pipeline", "run a recipe end to end (default: the embedded default recipe)"),
    "instruct-data": ("quark.tune.instruct", "build instruction/response chat data from the run's corpus (+ self-instruct)"),
    "sft": ("quark.tune.sft", "supervised fine-tuning on chat data: full or LoRA, assistant-only loss, packing"),
    "domain": ("quark.tune.domain", "continued pretraining on a domain corpus with general-corpus replay"),
    "reward": ("quark.align.reward", "train a reward model (Bradley-Terry) on preference pairs"),
    "dpo": ("quark.align.dpo", "preference optimisation: DPO, IPO or SimPO against a frozen reference"),
    "rl": ("quark.align.rl", "online RL with GRPO: a reward model or a rule reward, KL to the reference"),
    "redteam": ("quark.align.redteam", "attack suite against a model + safety filter: success rate before/after alignment"),
}


def build_parser(chosen=None):
    parser = argparse.ArgumentParser(prog="quark", description="Quark: develop language models end to end.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
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
    if args.version:
        import quark
        print(quark.__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    return importlib.import_module(COMMANDS[args.command][0]).run_cli(args) or 0


if __name__ == "__main__":
    sys.exit(main())
