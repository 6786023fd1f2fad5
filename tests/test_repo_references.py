"""Documents the sources cite (an upper-case NAME.md outside string literals) exist in the repository (CMakeLists.txt and benchmarks/harness.py cited
DESIGN.md and DEVELOPERS.md, which are not part of it)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_cited_markdown_document_exists():
    sources = [ROOT / "CMakeLists.txt", ROOT / "pyproject.toml", ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    for folder, pattern in (("benchmarks", "*.py"), ("python/quark", "*.py"), ("csrc", "*.*"), ("recipes", "*.yaml")):
        sources += sorted((ROOT / folder).rglob(pattern))
    missing = []
    for path in sources:
        if path.suffix in (".so", ".png"):
            continue
        for name in set(re.findall(r"(?<![\w\"'/])([A-Z][A-Z_]*\.md)\b(?![\"'])", path.read_text(errors="replace"))):
            if not (ROOT / name).exists() and not any(ROOT.glob(f"**/{name}")):
                missing.append(f"{path.relative_to(ROOT)} cites {name}")
    assert not missing, missing
