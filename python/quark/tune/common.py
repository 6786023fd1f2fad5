"""Pieces shared by the fine-tuning and alignment steps: finding the run's tokenizer and models, and
the step/CLI glue. Their training loop is quark.train.loop."""
import json
import time
from pathlib import Path

import yaml
from tokenizers import Tokenizer

from quark.chat import special_ids
from quark.config import ConfigError, from_dict
from quark.model.io import latest_model_dir


def load_tokenizer(path):
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist; run the tokenizer step first")
    tok = Tokenizer.from_file(str(path))
    special_ids(tok)   # fails early, naming the missing chat tokens
    return tok


def find_tokenizer(run_dir, model_dir=None):
    """The tokenizer saved beside the model, else the run's tokenizer step output."""
    for p in ([Path(model_dir) / "tokenizer.json"] if model_dir else []) + [Path(run_dir) / "tokenizer" / "tokenizer.json"]:
        if p.exists():
            return p
    raise FileNotFoundError(f"no tokenizer.json beside {model_dir} or in {run_dir}/tokenizer; run the tokenizer step first")


def resolve_model_dir(run_dir, init, order):
    """init 'auto': the first of run_dir/<step>/final for step in order; otherwise a path (absolute, or
    relative to run_dir)."""
    if init != "auto":
        p = Path(init)
        p = p if p.is_absolute() or p.exists() else Path(run_dir) / p
        if not (p / "model.safetensors").exists():
            raise FileNotFoundError(f"model directory {p} does not exist (no model.safetensors)")
        return p
    for step in order:
        d = Path(run_dir) / step / "final"
        if (d / "model.safetensors").exists():
            return d
    if not order:
        return latest_model_dir(run_dir)
    raise FileNotFoundError(f"{run_dir} holds no model to start from (looked for {', '.join(order)}/final); "
                            "run the earlier steps first or set init to a model directory")


def settings(cls, cfg, where):
    """Step settings from the recipe dict (the pipeline adds "seed"; it is kept apart)."""
    cfg = dict(cfg or {})
    seed = cfg.pop("seed", 0)
    if not isinstance(seed, int):
        raise ConfigError(f"{where}.seed: expected an integer, got {seed!r}")
    return from_dict(cls, cfg, where), seed


# ---- CLI glue: every command takes --run-dir, an optional --config YAML and --set key=value overrides.

def add_common_args(parser):
    parser.add_argument("--run-dir", required=True, help="run directory holding the earlier steps' outputs")
    parser.add_argument("--config", default=None, help="YAML file with the step's settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting (VALUE is parsed as YAML), repeatable")
    parser.add_argument("--seed", type=int, default=0)


def cli_config(args):
    cfg = {}
    if args.config:
        cfg = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(cfg, dict):
            raise ConfigError(f"{args.config}: expected a mapping of settings")
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        cfg[k.strip()] = yaml.safe_load(v)
    cfg["seed"] = args.seed
    return cfg


def run_step_cli(module, args):
    try:
        cfg = cli_config(args)
        module.validate_config(cfg)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    t0 = time.time()
    try:
        stats = module.run_step(Path(args.run_dir), cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 1
    print(json.dumps(stats, indent=1, default=str))
    print(f"done in {time.time() - t0:.1f}s")
    return 0

