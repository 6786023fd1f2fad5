"""Agents: a plan -> tool call -> observe loop with step and time limits, and a coordinator that lets
several agents work off one shared task board.

Agent loop (ReAct-style, Yao et al. 2023): the policy (any callable messages -> assistant text: the
run's chat model through rag.ModelGenerator, or a rule-based planner) sees the task and the tools; an
answer that is a tool call (quark.retrieval.tools format) is validated and executed, and the result is
appended as a `tool` message for the next step; a plain answer ends the task. A task fails when it
needs more than max_steps policy calls or max_seconds.

TaskBoard: tasks in a SQLite file (so agents in threads or in separate processes share it), with
kind, payload, dependencies and status todo -> running -> done | failed. claim() is one IMMEDIATE
transaction, so two agents never take the same task; a task is claimable only when every task it
depends on is done, and its prompt then carries their results. A claim is a lease: a worker that
dies (kill -9) leaves its task running only until the lease expires, then another worker takes it
over; finish() is accepted only from the task's current owner, and a task whose lease expired
max_claims times (it kills its workers) fails. Agents reach the board through two
tools, board_post (add a task, e.g. a planner splitting work) and board_get (read a task).
"""
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from quark.retrieval.tools import ToolRegistry, parse_tool_call

TASKS = """
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, payload TEXT NOT NULL,
    depends_on TEXT NOT NULL DEFAULT '[]', status TEXT NOT NULL DEFAULT 'todo', owner TEXT,
    result TEXT, error TEXT, steps INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, updated REAL NOT NULL,
    lease_until REAL, claims INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS tasks_status ON tasks(status, kind);
"""
STATUSES = ("todo", "running", "done", "failed")
COLUMNS = "id, kind, payload, depends_on, status, owner, result, error, steps"


class LeaseLost(RuntimeError):
    """finish() by a worker that no longer holds the task (its lease expired and it was taken over)."""


@dataclass
class Task:
    id: int
    kind: str
    payload: str
    depends_on: list
    status: str
    owner: str = None
    result: str = None
    error: str = None
    steps: int = 0


class TaskBoard:
    def __init__(self, path, lease_s=300.0, max_claims=3):
        if lease_s <= 0 or max_claims < 1:
            raise ValueError(f"lease_s must be > 0 and max_claims >= 1, got {lease_s}, {max_claims}")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path, self.lease_s, self.max_claims = str(path), lease_s, max_claims
        self.local = threading.local()
        with self._db() as db:
            db.executescript(TASKS)

    def _db(self):
        db = getattr(self.local, "db", None)
        if db is None:   # one connection per thread; SQLite does the locking between them
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            self.local.db = db
        return db

    def post(self, kind, payload, depends_on=()):
        deps = [int(d) for d in depends_on]
        now = time.time()
        db = self._db()
        missing = [d for d in deps if db.execute("SELECT 1 FROM tasks WHERE id=?", (d,)).fetchone() is None]
        if missing:
            raise ValueError(f"depends_on names unknown tasks {missing}")
        cur = db.execute("INSERT INTO tasks (kind, payload, depends_on, created, updated) VALUES (?, ?, ?, ?, ?)",
                         (kind, payload if isinstance(payload, str) else json.dumps(payload), json.dumps(deps), now, now))
        return cur.lastrowid

    def get(self, task_id):
        row = self._db().execute(f"SELECT {COLUMNS} FROM tasks WHERE id=?", (int(task_id),)).fetchone()
        return _task(row) if row else None

    def list(self, status=None):
        q = f"SELECT {COLUMNS} FROM tasks"
        rows = self._db().execute(q + (" WHERE status=? ORDER BY id" if status else " ORDER BY id"),
                                  (status,) if status else ())
        return [_task(r) for r in rows]

    def claim(self, owner, kinds=None, lease_s=None):
        """Atomically take the oldest ready task of one of `kinds` -> Task or None, leased to
        `owner` for lease_s seconds (default: the board's). A running task whose lease expired is
        ready again. A task whose dependency failed is failed too (it can never run)."""
        db = self._db()
        now = time.time()
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(f"SELECT {COLUMNS}, claims FROM tasks WHERE status='todo' OR "
                              "(status='running' AND lease_until < ?) ORDER BY id", (now,)).fetchall()
            for row in rows:
                t, claims = _task(row), row[-1]
                if kinds is not None and t.kind not in kinds:
                    continue
                if claims >= self.max_claims:
                    db.execute("UPDATE tasks SET status='failed', error=?, updated=? WHERE id=?",
                               (f"its lease expired {claims} times: the workers that claimed it died", now, t.id))
                    continue
                dep_status = [db.execute("SELECT status FROM tasks WHERE id=?", (d,)).fetchone()[0] for d in t.depends_on]
                if "failed" in dep_status:
                    db.execute("UPDATE tasks SET status='failed', error=?, updated=? WHERE id=?",
                               ("a task it depends on failed", now, t.id))
                    continue
                if all(s == "done" for s in dep_status):
                    db.execute("UPDATE tasks SET status='running', owner=?, lease_until=?, claims=claims+1, updated=? "
                               "WHERE id=?", (owner, now + (lease_s or self.lease_s), now, t.id))
                    db.execute("COMMIT")
                    t.status, t.owner = "running", owner
                    return t
            db.execute("COMMIT")
            return None
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def finish(self, task_id, owner, result=None, error=None, steps=0):
        """Record the outcome of a task `owner` holds; raises LeaseLost when it no longer does."""
        status = "failed" if error is not None else "done"
        cur = self._db().execute("UPDATE tasks SET status=?, result=?, error=?, steps=?, lease_until=NULL, updated=? "
                                 "WHERE id=? AND status='running' AND owner=?",
                                 (status, result, error, steps, time.time(), int(task_id), owner))
        if cur.rowcount != 1:
            t = self.get(task_id)
            now = f"{t.status}, owner {t.owner!r}" if t else "no such task"
            raise LeaseLost(f"task {task_id} is not held by {owner!r} ({now}): its lease expired and it was "
                            "taken over, or it was never claimed by it")

    def counts(self):
        out = dict.fromkeys(STATUSES, 0)
        out.update(dict(self._db().execute("SELECT status, COUNT(*) FROM tasks GROUP BY status")))
        return out

    def pending(self):
        c = self.counts()
        return c["todo"] + c["running"]

    def board_tools(self, registry):
        """Register board_post / board_get on a tool registry (for planner agents)."""
        registry.register("board_post", "post a task for another agent; returns its id",
                          {"type": "object", "properties": {"kind": {"type": "string", "minLength": 1},
                                                            "payload": {"type": "string"},
                                                            "depends_on": {"type": "array", "items": {"type": "integer"}}},
                           "required": ["kind", "payload"], "additionalProperties": False},
                          lambda kind, payload, depends_on=(): {"id": self.post(kind, payload, depends_on)})
        registry.register("board_get", "read a task: status and result",
                          {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
                           "additionalProperties": False},
                          lambda id: _public(self.get(id)))
        return registry


def _task(row):
    return Task(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5], row[6], row[7], row[8])


def _public(task):
    if task is None:
        raise KeyError("no such task")
    return {"id": task.id, "kind": task.kind, "status": task.status, "result": task.result, "error": task.error}


@dataclass
class AgentRun:
    answer: str = None
    error: str = None
    steps: int = 0
    tool_calls: int = 0
    messages: list = field(default_factory=list)
    seconds: float = 0.0


class Agent:
    def __init__(self, name, policy, registry=None, kinds=None, system="", max_steps=8, max_seconds=60.0):
        self.name, self.policy = name, policy
        self.registry = registry or ToolRegistry()
        self.kinds = kinds                      # task kinds this agent takes (None: any)
        self.system, self.max_steps, self.max_seconds = system, max_steps, max_seconds

    def run(self, prompt, context=None):
        """One task: plan -> call -> observe until a plain answer or a limit -> AgentRun."""
        t0 = time.perf_counter()
        system = "\n\n".join(s for s in (self.system, self.registry.system_prompt() if self.registry.tools else "") if s)
        messages = ([{"role": "system", "content": system}] if system else [])
        user = prompt if not context else prompt + "\n\nResults of earlier tasks:\n" + context
        messages.append({"role": "user", "content": user})
        run = AgentRun(messages=messages)
        while True:
            if run.steps >= self.max_steps:
                run.error = f"step limit reached ({self.max_steps} steps) without an answer"
                break
            if time.perf_counter() - t0 > self.max_seconds:
                run.error = f"time limit reached ({self.max_seconds}s) without an answer"
                break
            try:
                text = self.policy(messages)
            except Exception as e:   # a broken policy fails its task; the agent goes on with the next one
                run.error = f"policy failed: {type(e).__name__}: {e}"
                break
            run.steps += 1
            messages.append({"role": "assistant", "content": text})
            call = parse_tool_call(text)
            if call is None:
                run.answer = text
                break
            run.tool_calls += 1
            messages.append(self.registry.call(call).to_message())
        run.seconds = time.perf_counter() - t0
        return run


class Coordinator:
    """Agents in threads sharing one TaskBoard until no task is left (or a deadline)."""

    def __init__(self, board, agents, poll_s=0.02):
        names = [a.name for a in agents]
        if len(set(names)) != len(names):
            raise ValueError(f"agent names must be unique, got {names}")
        self.board, self.agents, self.poll_s = board, agents, poll_s

    def _context(self, task):
        parts = []
        for d in task.depends_on:
            t = self.board.get(d)
            parts.append(f"task {t.id} ({t.kind}): {t.result}")
        return "\n".join(parts)

    def _work(self, agent, deadline, log):
        idle_since = None
        while time.monotonic() < deadline:
            # The agent checks its time limit between policy calls, so one call may overrun it: twice the limit.
            task = self.board.claim(agent.name, agent.kinds, lease_s=2 * agent.max_seconds)
            if task is None:
                if self.board.pending() == 0:
                    return
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since > 2.0 and not self._claimable_by_anyone():
                    return   # what is left waits on kinds no agent takes
                time.sleep(self.poll_s)
                continue
            idle_since = None
            run = agent.run(task.payload, self._context(task))
            try:
                self.board.finish(task.id, agent.name, run.answer, run.error, run.steps)
            except LeaseLost:
                continue   # another agent took the task over; its outcome counts
            log.append({"task": task.id, "kind": task.kind, "agent": agent.name, "steps": run.steps,
                        "tool_calls": run.tool_calls, "ok": run.error is None, "seconds": round(run.seconds, 3)})

    def _claimable_by_anyone(self):
        kinds = [a.kinds for a in self.agents]
        return any(k is None for k in kinds) or any(
            t.kind in set().union(*[set(k) for k in kinds]) for t in self.board.list("todo") + self.board.list("running"))

    def run(self, max_seconds=300.0):
        """Work the board until it is empty -> {"log": [...], "counts": {...}, "seconds": s}."""
        t0 = time.monotonic()
        log = []
        threads = [threading.Thread(target=self._work, args=(a, t0 + max_seconds, log), name=f"agent-{a.name}")
                   for a in self.agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"log": log, "counts": self.board.counts(), "seconds": round(time.monotonic() - t0, 3)}


# ------------------------------------------------------------------------------ CLI `quark agent`
def configure_parser(parser):
    parser.add_argument("run_dir", help="run directory (its chat model is the policy; tools: calculator, and "
                                        "search_docs over index/), or a model directory (Quark or Hugging Face)")
    parser.add_argument("task", help="what the agent should do")
    parser.add_argument("--api", action="append", default=[], metavar="NAME=URL",
                        help="expose an HTTP JSON API as a tool (GET, query-string arguments; host allow-listed)")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--max-new-tokens", type=int, default=96)


def run_cli(args):
    from quark.chat import chat_format
    from quark.infer.engine import load_for_serving
    from quark.retrieval.rag import ModelGenerator
    from quark.retrieval.tools import builtin_tools, register_http_api, store_search
    from quark.rundir import RunDir
    try:
        model, tokenizer, model_dir, run_root = load_for_serving(args.run_dir)
        run_dir = RunDir(run_root) if run_root is not None else None
        search = None
        if run_dir is not None and run_dir.has("index", "config.json"):
            from quark.retrieval.store import open_run_store
            search = store_search(open_run_store(run_dir))
        reg = builtin_tools(search)   # the tools the run's SFT data taught its model to call
        for spec in args.api:
            name, _, url = spec.partition("=")
            if not url:
                raise ValueError(f"--api {spec!r}: expected NAME=URL")
            register_http_api(reg, name, f"HTTP API at {url}", {"type": "object"}, url)
        # the policy's own chat format: Quark's template, or an HF checkpoint's (its eos ids stop a turn)
        policy = ModelGenerator(model, chat_format(tokenizer, model_dir), args.max_new_tokens)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}")
        return 2
    run = Agent("cli", policy, reg, max_steps=args.max_steps, max_seconds=args.max_seconds).run(args.task)
    for m in run.messages[1 if run.messages[0]["role"] == "system" else 0:]:
        print(f"<{m['role']}> {m['content']}")
    print(json.dumps({"answer": run.answer, "error": run.error, "steps": run.steps, "tool_calls": run.tool_calls,
                      "seconds": round(run.seconds, 2)}))
    return 0 if run.error is None else 1
