"""Command-line front end shared by the data steps: `quark <step> --run-dir DIR --some-setting V`
builds the same settings dict a recipe would (flags come from the step's config dataclass, so
the two never drift apart), validates it, runs the step and prints its stats."""
import argparse
import dataclasses
import json
import typing
from pathlib import Path

from quark.config import ConfigError


def _flag(name):
    return "--" + name.replace("_", "-")


def add_config_arguments(parser, cls, help_texts=None):
    parser.add_argument("--run-dir", default="runs/default", help="run directory (default: runs/default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "seed":
            continue
        tp, origin = hints[f.name], typing.get_origin(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{(help_texts or {}).get(f.name, '')} (default: {default!r})".strip()
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=text)
        elif tp in (int, float, str):
            parser.add_argument(_flag(f.name), type=tp, default=None, help=text)
        elif origin is typing.Literal:
            parser.add_argument(_flag(f.name), choices=typing.get_args(tp), default=None, help=text)
        else:  # lists (and str-or-list): one or more values
            parser.add_argument(_flag(f.name), nargs="+", default=None, help=text)


def config_from_args(args, cls):
    """The settings the user gave on the command line (others keep the dataclass defaults)."""
    hints = typing.get_type_hints(cls)
    cfg = {"seed": args.seed}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if f.name == "seed" or value is None:
            continue
        tp = hints[f.name]
        if isinstance(value, list) and typing.get_origin(tp) is typing.Union and str in typing.get_args(tp) and len(value) == 1:
            value = value[0]
        elif isinstance(value, list):
            (arg,) = typing.get_args(tp)[:1] or (str,)
            if arg in (int, float):
                value = [arg(v) for v in value]
        cfg[f.name] = value
    return cfg


def run_cli(module, cls, args):
    try:
        cfg = config_from_args(args, cls)
        module.validate_config(cfg)
        stats = module.run_step(Path(args.run_dir), cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    print(json.dumps(stats, indent=1, default=str))
    return 0
