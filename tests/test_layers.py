"""The import-linter contracts in pyproject.toml ([tool.importlinter]): layers only point down, and no
import cycles between sibling packages or modules. A broken contract fails here with import-linter's
report, naming each offending import and its line."""
import contextlib
import io
from pathlib import Path

from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = lint_imports(str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    assert code == 0, out.getvalue()
