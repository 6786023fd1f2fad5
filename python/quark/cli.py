"""The `quark` command. Every step (quark.recipe.STEPS) gets the same generated command line:

    quark <step> [--run-dir DIR] [--config FILE] [--set KEY=VALUE ...] [--<setting> VALUE ...]

one flag per field of the step's settings dataclass, with the field's comment as help and its
default; --config reads YAML or JSON, --set parses VALUE as YAML; flags win over --set, --set over
--config. Tools that are not steps keep their own parsers (module with configure_parser(parser) and
run_cli(args) -> exit code). Modules are imported only for the command that runs, so `quark --help`
imports no torch."""
import argparse
import dataclasses
import importlib
import json
import sys
import time
import typing

from quark.recipe import STEPS

TOOLS = {
    # name -> (module, one-line help)
    "info": ("quark._runtime", "version, CPU features, kernel dispatch paths, threads, GPU stack"),
    "run": ("quark.pipeline", "run a recipe end to end with resume (default: the embedded default recipe)"),
    "hpo": ("quark.train.trainer", "search pretraining lr / weight decay / warmup by successive halving"),
    "search": ("quark.retrieval.store", "search a run's index (hybrid, BM25 or dense)"),
    "ask": ("quark.retrieval.rag", "answer a question from a run's index with cited sources"),
    "route": ("quark.orchestrate.router", "classify a request's intent and route it to a model or pipeline"),
    "agent": ("quark.orchestrate.agent", "run an agent (the run's chat model + tools) on a task"),
    "shard": ("quark.optimize.shard", "reshard a model into HF-style safetensors shards; check tensor-parallel logits"),
    "export": ("quark.export", "write a model as a Hugging Face directory, a LoRA adapter as PEFT, or a GGUF file"),
    "generate": ("quark.serve.generate", "generate text from a run's latest model (or a model directory)"),
    "chat": ("quark.serve.repl", "chat with a model in the terminal, streaming replies"),
    "serve": ("quark.serve.server", "OpenAI-compatible API server with a chat and training-runs web UI"),
    "registry": ("quark.improve.registry", "query a run's model registry: list, show, register, promote"),
    "augment": ("quark.improve.augment", "augment chat data: noise, model paraphrases, code/docstring round trips"),
    "automl": ("quark.automl", "search recipe settings with successive halving over pipeline runs"),
}
COMMANDS = {**{name: (module, help_text) for name, (module, help_text, _) in STEPS.items()}, **TOOLS}


# ---- the generated step command line

def _flag(name):
    return "--" + name.replace("_", "-")


def _int(text):
    value = float(text)     # accepts 2e6 for an integer setting
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    return int(text) if text.lstrip("-").isdigit() else int(value)


def _yaml(text):
    import yaml
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"not valid YAML: {e}") from None


def add_step_arguments(parser, step):
    from quark.config import field_help
    parser.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML or JSON file of settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="one setting, VALUE parsed as YAML (repeatable)")
    helps = field_help(step.config)
    hints = typing.get_type_hints(step.config)
    group = parser.add_argument_group(f"{step.name} settings")
    for f in dataclasses.fields(step.config):
        tp, dest = hints[f.name], f"setting_{f.name}"   # apart from --run-dir, --config, --set
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{helps.get(f.name, '')} (default: {default!r})".strip().replace("%", "%%")
        origin = typing.get_origin(tp)
        if tp is bool:
            group.add_argument(_flag(f.name), dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif tp is int:
            group.add_argument(_flag(f.name), dest=dest, type=_int, default=None, metavar="INT", help=text)
        elif tp in (float, str):
            group.add_argument(_flag(f.name), dest=dest, type=tp, default=None, metavar=tp.__name__.upper(), help=text)
        elif origin is typing.Literal:
            group.add_argument(_flag(f.name), dest=dest, choices=typing.get_args(tp), default=None, help=text)
        elif tp is list or origin is list:
            group.add_argument(_flag(f.name), dest=dest, nargs="+", type=_yaml, default=None, metavar="VALUE", help=text)
        else:   # mappings and unions: one YAML value
            group.add_argument(_flag(f.name), dest=dest, type=_yaml, default=None, metavar="YAML", help=text)


def step_settings(args, step):
    """The settings dict the command line gives: --config, then --set, then the flags given."""
    from quark.config import read_settings
    cfg = read_settings(args.config, args.set)
    for f in dataclasses.fields(step.config):
        value = getattr(args, f"setting_{f.name}", None)
        if value is not None:
            cfg[f.name] = value
    return cfg


def run_step_cli(step, args):
    from quark.config import ConfigError
    from quark.rundir import RunDir
    try:
        cfg = step.settings(step_settings(args, step))
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    run_dir = RunDir(args.run_dir)
    t0 = time.time()
    try:
        stats = step.run(run_dir, cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    run_dir.write_manifest(step.name, cfg)
    print(json.dumps(stats, indent=1, default=str))
    print(f"done in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


# ---- the command

def build_parser(chosen=None):
    parser = argparse.ArgumentParser(prog="quark", description="Quark: develop language models end to end.")
    parser.add_argument("--version", dest="show_version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != chosen:
            continue
        if name in STEPS:
            from quark.recipe import load_step
            add_step_arguments(p, load_step(name))
        else:
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
    if args.command in STEPS:
        from quark.recipe import load_step
        return run_step_cli(load_step(args.command), args)
    return importlib.import_module(COMMANDS[args.command][0]).run_cli(args) or 0


if __name__ == "__main__":
    sys.exit(main())
