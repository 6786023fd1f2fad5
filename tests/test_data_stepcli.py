"""The data steps' command lines (quark.data.stepcli through quark.cli): flags come from the step's
config dataclass and build the same settings a recipe would."""
import json

from quark.cli import main


def test_scrape_and_clean_from_the_command_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"m{i}.py").write_text(f"def function_number_{i}(value):\n    return value * {i} + {i}\n" * 3)
    run = tmp_path / "run"
    assert main(["scrape", "--run-dir", str(run), "--roots", str(src), "--max-files", "5", "--seed", "3"]) == 0
    stats = json.loads((run / "scrape" / "stats.json").read_text())
    assert stats["kept"] == 5
    assert main(["clean", "--run-dir", str(run), "--no-pii", "--min-chars", "10"]) == 0
    assert json.loads((run / "clean" / "stats.json").read_text())["kept"] == {"code": 5}


def test_bad_values_are_reported(tmp_path, capsys):
    assert main(["dedup", "--run-dir", str(tmp_path), "--threshold", "2"]) == 2
    assert "dedup.threshold" in capsys.readouterr().out
    assert main(["pack", "--run-dir", str(tmp_path)]) == 2
    assert "run the dedup step first" in capsys.readouterr().out
