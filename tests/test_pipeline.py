"""Recipe loading and validation: a malformed recipe fails before any work, naming the key."""
import subprocess
import sys

import pytest

from quark.config import ConfigError
from quark.pipeline import STEP_NAMES, default_recipe_path, load_recipe, step_config


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_default_recipe_loads_and_is_valid():
    r = load_recipe(default_recipe_path())
    assert r["name"] == "default" and r["budget"] == "default"
    assert set(r["steps"]) <= set(STEP_NAMES)


def test_budget_overrides_apply(tmp_path):
    p = write(tmp_path, "steps:\n  crawl:\n    max_pages: 100\n    budgets:\n      tiny: {max_pages: 5}\n")
    assert step_config(load_recipe(p, budget="tiny"), "crawl") == {"max_pages": 5}
    assert step_config(load_recipe(p), "crawl") == {"max_pages": 100}


@pytest.mark.parametrize("text,message", [
    ("nmae: x\n", "unknown key 'nmae'; allowed keys: name, run_dir, seed, budget, steps"),
    ("steps:\n  pretrian: {}\n", "unknown step 'pretrian'; allowed steps: crawl"),
    ("budget: huge\n", "budget must be one of ['tiny', 'default', 'large']"),
    ("seed: abc\n", "seed must be an integer"),
    ("steps: [1]\n", "steps must be a mapping"),
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("a: [\n", "not valid YAML"),
])
def test_malformed_recipes_name_the_problem(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        load_recipe(write(tmp_path, text))
    assert message in str(e.value)


def test_unknown_budget_in_step_overrides(tmp_path):
    p = write(tmp_path, "steps:\n  crawl:\n    budgets:\n      huge: {}\n")
    with pytest.raises(ConfigError, match="unknown budget 'huge'"):
        step_config(load_recipe(p), "crawl")


def test_cli_reports_malformed_recipe_before_work(tmp_path):
    p = write(tmp_path, f"run_dir: {tmp_path / 'run'}\nsteps:\n  bogus: {{}}\n")
    r = subprocess.run([sys.executable, "-m", "quark.cli", "run", str(p)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown step 'bogus'" in r.stdout
    assert not (tmp_path / "run").exists()


def test_plan_lists_every_step(tmp_path):
    r = subprocess.run([sys.executable, "-m", "quark.cli", "run", "--plan"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for name in STEP_NAMES:
        assert name in r.stdout
