"""Model registry in SQLite: versions, lineage, metrics, per-item results and stage (candidate /
champion / archived).

A candidate becomes champion only through the evaluation gate: its per-item results are compared
with the champion's by a paired test (quark.eval.gate). A significant regression fails the gate; a
candidate that passes but is behind the champion on any gated metric (an insignificant loss) stays a
candidate, so the champion, the baseline of every later gate, never slides by small steps; with a
champion in place, a candidate with no items in common with it is not promoted either (no evidence).
Every change is one SQLite transaction, so a crash never leaves two champions or none.
"""
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from quark.config import ConfigError, Step, from_dict
from quark.eval import gate as gates
from quark.rundir import RunDir

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    version     TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    path        TEXT NOT NULL,
    parent      TEXT REFERENCES models(version),
    stage       TEXT NOT NULL CHECK (stage IN ('candidate', 'champion', 'archived')),
    metrics     TEXT NOT NULL DEFAULT '{}',
    items       TEXT NOT NULL DEFAULT '{}',
    created_at  REAL NOT NULL,
    promoted_at REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_champion ON models(stage) WHERE stage = 'champion';
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    version TEXT NOT NULL,
    event   TEXT NOT NULL,
    detail  TEXT NOT NULL DEFAULT '',
    at      REAL NOT NULL
);
"""


class Registry:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)   # explicit transactions below
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)
            if "items" not in {r["name"] for r in self.db.execute("PRAGMA table_info(models)")}:   # registries before items
                self.db.execute("ALTER TABLE models ADD COLUMN items TEXT NOT NULL DEFAULT '{}'")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"model registry {self.path} is not a valid SQLite database: {e}") from None

    def close(self):
        self.db.close()

    def _tx(self):
        db = self.db

        class Tx:
            def __enter__(self):
                db.execute("BEGIN IMMEDIATE")
                return db

            def __exit__(self, exc_type, *rest):
                db.execute("ROLLBACK" if exc_type else "COMMIT")

        return Tx()

    def register(self, version, path, name=None, parent=None, metrics=None, items=None):
        """Add a candidate (idempotent for the same version: refreshes its metrics and items)."""
        if parent is not None and self.get(parent) is None:
            raise ValueError(f"parent version {parent!r} is not registered")
        with self._tx() as db:
            row = db.execute("SELECT version FROM models WHERE version = ?", (version,)).fetchone()
            if row:
                if metrics is not None:
                    db.execute("UPDATE models SET metrics = ? WHERE version = ?", (json.dumps(metrics), version))
                if items is not None:
                    db.execute("UPDATE models SET items = ? WHERE version = ?", (json.dumps(items), version))
            else:
                db.execute("INSERT INTO models (version, name, path, parent, stage, metrics, items, created_at) "
                           "VALUES (?, ?, ?, ?, 'candidate', ?, ?, ?)",
                           (version, name or Path(path).parent.name, str(path), parent, json.dumps(metrics or {}),
                            json.dumps(items or {}), time.time()))
                db.execute("INSERT INTO events (version, event, at) VALUES (?, 'registered', ?)", (version, time.time()))
        return self.get(version)

    def _row(self, row):
        return None if row is None else dict(row) | {"metrics": json.loads(row["metrics"]), "items": json.loads(row["items"])}

    def get(self, version):
        return self._row(self.db.execute("SELECT * FROM models WHERE version = ?", (version,)).fetchone())

    def _require(self, version):
        m = self.get(version)
        if m is None:
            raise KeyError(f"version {version!r} is not registered")
        return m

    def champion(self):
        return self._row(self.db.execute("SELECT * FROM models WHERE stage = 'champion'").fetchone())

    def list(self):
        return [self._row(r) for r in self.db.execute("SELECT * FROM models ORDER BY created_at")]

    def lineage(self, version):
        chain, m = [], self._require(version)
        while m is not None:
            chain.append(m["version"])
            m = self.get(m["parent"]) if m["parent"] else None
        return chain

    def events(self, version=None):
        q = "SELECT * FROM events" + (" WHERE version = ?" if version else "") + " ORDER BY id"
        return [dict(r) for r in self.db.execute(q, (version,) if version else ())]

    def _event(self, db, version, event, detail=""):
        db.execute("INSERT INTO events (version, event, detail, at) VALUES (?, ?, ?, ?)", (version, event, detail, time.time()))

    def promote(self, version, confidence=gates.CONFIDENCE):
        """Gate the candidate against the champion item by item; promote when it passes and is behind on
        nothing. -> (promoted, checks)."""
        candidate = self._require(version)
        if candidate["stage"] == "champion":
            return True, []
        champion = self.champion()
        checks = gates.compare(candidate["items"], champion["items"], confidence) if champion else []
        failed = [c for c in checks if c.regressed]
        behind = [c for c in checks if c.behind and not c.regressed]
        with self._tx() as db:
            if failed:
                self._event(db, version, "gate_failed", "; ".join(c.describe() for c in failed))
                return False, checks
            if champion and not checks:
                self._event(db, version, "held", f"no items in common with champion {champion['version']}: no evidence")
                return False, checks
            if behind:
                self._event(db, version, "held", "passed the gate but behind the champion on: " + ", ".join(c.metric for c in behind))
                return False, checks
            if champion:
                db.execute("UPDATE models SET stage = 'archived' WHERE version = ?", (champion["version"],))
                self._event(db, champion["version"], "archived", f"replaced by {version}")
            db.execute("UPDATE models SET stage = 'champion', promoted_at = ? WHERE version = ?", (time.time(), version))
            self._event(db, version, "promoted", f"over {champion['version']}" if champion else "first champion")
        return True, checks


@dataclass
class PromoteConfig:
    registry: str = ""      # registry database shared across runs; default: run_dir/promote/registry.sqlite
    confidence: float = gates.CONFIDENCE   # the gate's confidence level (paired test over items)


def run_step(run_dir, cfg):
    """Register every trained model this run produced (in lineage order: pretrain -> ... -> rl) and
    promote the evaluated one through the gate."""
    from quark.eval.harness import model_version
    c = validate_config(cfg)
    run_dir = RunDir.of(run_dir)
    results = run_dir.json("eval", "results.json")
    run_dir.output("promote")
    reg = Registry(c.registry or run_dir.registry_path)
    try:
        parent = None
        for step, _ in run_dir.trained_models():
            d = run_dir.model(step)
            v = model_version(d)
            reg.register(v, d, name=f"{run_dir.root.name}/{step}", parent=parent)
            parent = v
        reg.register(results["version"], results["model_dir"], parent=None if results["version"] == parent else parent,
                     metrics=results["metrics"], items=results.get("items", {}))
        promoted, checks = reg.promote(results["version"], c.confidence)
        champ = reg.champion()
        return {"candidate": results["version"], "promoted": promoted, "champion": champ["version"] if champ else None,
                "gate_passed": not any(c.regressed for c in checks), "confidence": c.confidence,
                "regressions": [c.describe() for c in checks if c.regressed], "checks": [c.describe() for c in checks],
                "models": len(reg.list())}
    finally:
        reg.close()


def validate_config(cfg):
    c = from_dict(PromoteConfig, cfg, "promote")
    if not 0.0 < c.confidence < 1.0:
        raise ConfigError(f"promote.confidence: must be in (0, 1), got {c.confidence}")
    return c


STEP = Step(name="promote", config=PromoteConfig, run=run_step, check=validate_config)


# ---- `quark registry`: query and edit a run's registry by hand

def configure_parser(p):
    p.add_argument("--run-dir", default="runs/default", help="run whose registry to use (default: runs/default)")
    p.add_argument("--db", default=None, help="a registry database (SQLite) other than the run's")
    sub = p.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="every version with its stage")
    s = sub.add_parser("show", help="one version: metrics, lineage, events")
    s.add_argument("version")
    r = sub.add_parser("register", help="add a model directory as a candidate")
    r.add_argument("model_dir")
    r.add_argument("--parent", default=None)
    r.add_argument("--metrics", default=None, help="results JSON with metrics and per-item scores (RUN_DIR/eval/results.json)")
    pr = sub.add_parser("promote", help="promote a candidate through the gate (a paired test against the champion)")
    pr.add_argument("version")
    pr.add_argument("--confidence", type=float, default=gates.CONFIDENCE, help="the gate's confidence level")


def run_cli(args):
    from quark.eval.harness import load_results, model_version
    path = Path(args.db) if args.db else RunDir(args.run_dir).registry_path
    if not path.exists() and args.action != "register":
        print(f"error: no model registry at {path}: run the promote step (quark run) or pass --db")
        return 2
    reg = Registry(path)
    try:
        if args.action == "list":
            for m in reg.list():
                print(f"{m['version']}  {m['stage']:<9}  {m['name']:<24} parent={m['parent'] or '-'}  {m['path']}")
        elif args.action == "show":
            m = reg._require(args.version)
            print(json.dumps(m | {"lineage": reg.lineage(args.version), "events": reg.events(args.version)}, indent=1))
        elif args.action == "register":
            res = load_results(args.metrics) if args.metrics else {}
            m = reg.register(model_version(args.model_dir), args.model_dir, parent=args.parent,
                             metrics=res.get("metrics"), items=res.get("items"))
            print(f"registered {m['version']} as {m['stage']}")
        elif args.action == "promote":
            promoted, checks = reg.promote(args.version, args.confidence)
            for c in checks:
                print("gate:", c.describe())
            print("promoted to champion" if promoted else f"stays candidate: {reg.events(args.version)[-1]['detail']}")
            return 0 if promoted else 1
    except (KeyError, ValueError, FileNotFoundError) as e:
        print(f"error: {e.args[0]}")
        return 2
    finally:
        reg.close()
    return 0
