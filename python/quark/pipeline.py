"""`quark run [RECIPE]`: every step of the life cycle in order, in one run directory, with resume by content.

Step contract (quark.config.Step): run(run_dir, settings) reads what earlier steps wrote through
quark.rundir.RunDir, writes its own outputs under run_dir/<step>/ atomically, resumes its own partial
work, and returns JSON-able stats. After a step the pipeline writes run_dir/<step>/manifest.json with
its settings and the content fingerprints (sha256) of every file it read; a rerun skips a step only
when both are unchanged, so a step redone upstream with other output redoes what read it.
run_dir/pipeline.json keeps each step's stats and timings for the report.
"""
import dataclasses
import os
import time
from pathlib import Path

from quark.config import ConfigError
from quark.io import atomic_write_json
from quark.recipe import BUDGETS, STEP_NAMES, STEPS, load_recipe, load_step, recipe_steps, step_config
from quark.rundir import RunDir


def settings(step, recipe):
    """A step's settings from the recipe, with the recipe seed for steps that take one."""
    cfg = step_config(recipe, step.name)
    if "seed" in {f.name for f in dataclasses.fields(step.config)}:
        cfg.setdefault("seed", recipe["seed"])
    return cfg


def validate(recipe):
    """Check every step's settings with its own dataclass before any work starts."""
    for name in recipe_steps(recipe):
        step = load_step(name)
        try:
            step.validate(settings(step, recipe))
        except ConfigError as e:
            raise ConfigError(f"steps.{name}: {e}") from None


def run(recipe, only=None, force=False, log=print):
    """Run the recipe's steps (or only those named); -> True."""
    run_dir = RunDir(recipe["run_dir"])
    run_dir.root.mkdir(parents=True, exist_ok=True)
    state = run_dir.state()
    state["recipe"] = recipe
    atomic_write_json(run_dir.state_path, state)    # before any step: RunDir reads the recipe's base_model here
    names = [n for n in STEP_NAMES if n in recipe_steps(recipe) or only and n in only]
    for name in names:
        if only and name not in only:
            continue
        step = load_step(name)
        cfg = step.settings(settings(step, recipe))     # every setting, defaults filled in: what the manifest holds
        fresh, why = run_dir.up_to_date(name, cfg)
        if fresh and not force:
            log(f"[{name}] up to date, skipped")
            continue
        log(f"[{name}] running ({'forced' if force else why})")
        t0 = time.time()
        step_dir = RunDir(run_dir.root)     # collects what this step reads
        stats = step.run(step_dir, cfg)
        step_dir.write_manifest(name, cfg)
        state["steps"][name] = {"status": "done", "seconds": round(time.time() - t0, 2), "stats": stats,
                                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        atomic_write_json(run_dir.state_path, state)
        log(f"[{name}] done in {time.time() - t0:.1f}s")
    atomic_write_json(run_dir.state_path, state)
    log("\n".join(summary(run_dir.root, state["steps"])))
    return True


def summary(root, steps):
    """The lines `quark run` ends with: the key metrics of the steps that ran, where the report is, and
    what to try next. A step absent from the recipe is absent here."""
    st = {name: s.get("stats") or {} for name, s in steps.items()}
    seconds = sum(s.get("seconds", 0) for s in steps.values())
    lines = [f"\nrun {root}: {len(steps)} steps, {seconds / 60:.1f} min in all"]

    def add(step, text):
        lines.append(f"  {step:<9} {text}")

    if (p := st.get("pretrain")) and p.get("val_loss") is not None:
        add("pretrain", f"{p['params'] / 1e6:.2f}M parameters, {p['tokens']:,} tokens, "
                        f"validation loss {p['val_loss']:.3f} nats/token")
    if (s := st.get("sft")) and "val_loss_after" in s:
        add("sft", f"validation loss {s['val_loss_before']:.3f} -> {s['val_loss_after']:.3f} on held-out answers")
    if (d := st.get("dpo")) and "heldout_after" in d:
        before, after = d["heldout_before"]["reward_accuracy"], d["heldout_after"]["reward_accuracy"]
        add("dpo", f"held-out preference accuracy {before:.0%} -> {after:.0%}")
    if (r := st.get("rl")) and (h := r.get("heldout_tasks")):
        base = Path(str(h.get("baseline_model", "baseline"))).parent.name or "baseline"
        add("rl", f"held-out verifiable tasks solved: {base} {h['baseline']:.0%}, rl {h['rl']:.0%} "
                  f"(paired difference {h['diff']:+.3f} +- {2 * h['se']:.3f})")
    if (e := st.get("eval")) and "heldout/bits_per_byte" in e:
        gate = {True: "passed", False: "failed"}.get(e.get("gate_passed"), "not run")
        add("eval", f"held-out {e['heldout/bits_per_byte']:.3f} bits/byte, regression gate {gate}")
    for scheme, q in (st.get("quantize") or {}).items():
        if isinstance(q, dict) and "perplexity_delta" in q:
            add("quantize", f"{scheme}: {q['ratio']:.1f}x smaller, perplexity {q['perplexity_delta']:+.2f}, "
                            f"decode {q['speedup']:.2f}x the float model")
    if report := st.get("report", {}).get("report"):
        lines.append(f"\nreport: {report}")
    if "pretrain" in steps or "sft" in steps:
        lines += ["next:", f"  quark chat {root}                  talk to the run's latest model",
                  f"  quark serve {root}                 OpenAI-compatible API + web chat on http://127.0.0.1:8000",
                  f"  quark generate {root} --prompt 'def read_file(path):'"]
    return lines


def preview_plan(recipe):
    """The recipe's pretraining plan, before any data exists (tokens: the run's pack when present)."""
    from quark.train.plan import preview
    plan_step, tok_step = load_step("plan"), load_step("tokenizer")
    vocab = tok_step.validate(settings(tok_step, recipe)).vocab_size
    return preview(recipe["run_dir"], settings(plan_step, recipe), vocab)


def configure_parser(parser):
    parser.add_argument("recipe", nargs="?", default=None, help="recipe YAML file, or a shipped recipe's name: default, finetune (default: default)")
    parser.add_argument("--budget", choices=BUDGETS, default=None,
                        help="scale every step: tiny (CI, minutes), default, large (a bigger model and corpus)")
    parser.add_argument("--run-dir", default=None, help="override the recipe's run directory")
    parser.add_argument("--base-model", default=None, metavar="DIR",
                        help="start from this model directory (Hugging Face or Quark) instead of pretraining")
    parser.add_argument("--only", nargs="*", default=None, choices=STEP_NAMES, metavar="STEP",
                        help="run only these steps (their inputs must exist)")
    parser.add_argument("--force", action="store_true", help="rerun steps even when up to date")
    parser.add_argument("--plan", action="store_true", help="print the steps and the pretraining plan, and exit")


def run_cli(args):
    try:
        recipe = load_recipe(args.recipe, args.budget, args.run_dir, args.base_model)
        validate(recipe)
    except ConfigError as e:
        print(f"error: {e}")
        return 2
    print(f"recipe {recipe['name']} (budget {recipe['budget']}) -> {recipe['run_dir']}")
    for i, name in enumerate(recipe_steps(recipe), 1):
        print(f"  {i:2d}. {name:<10} {STEPS[name][0]}")
    if args.plan and recipe.get("base_model"):
        print(f"starts from the base model {recipe['base_model']}: no pretraining to plan")
        return 0
    if args.plan:
        try:
            print(preview_plan(recipe))
        except (ConfigError, FileNotFoundError, ValueError) as e:
            print(f"error: {e}")
            return 2
        return 0
    os.environ.setdefault("PYTHONHASHSEED", str(recipe["seed"]))
    return 0 if run(recipe, only=args.only, force=args.force) else 1
