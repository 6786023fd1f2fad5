"""Feedback from users: ratings of model responses in SQLite, and the preference pairs they make.

Shared below the steps: the server writes it (`POST /v1/feedback`, the web UI's thumbs) and the
reward model / DPO read it (their `feedback` setting names the database). Each row keeps the prompt
(chat messages), the response, its rating (any finite number; thumbs: "up" = 1, "down" = 0), an
optional correction (the user's own better answer), the model and the request/response ids.

preference_pairs():
  - a correction is preferred over the response it corrects;
  - responses to one prompt are grouped, repeated ratings of a response averaged, and a better one
    paired with a worse one when their means differ by at least `min_margin` (best against worst first,
    each response used once per prompt, so one strong answer does not dominate the set); a thumbs-up
    alternative thus pairs against a thumbs-down reply.
Output records, one per line of the JSONL file the reward model and DPO read:
    {"prompt": [messages], "chosen": str, "rejected": str}
Writes are transactions in WAL mode (readers never block the server's writer; a crash loses at most
the row being written).
"""
import hashlib
import json
import math
import sqlite3
import threading
import time
from pathlib import Path

from quark.chat import validate_messages
from quark.io import atomic_write_text

THUMBS = {"up": 1.0, "down": 0.0}

FEEDBACK = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, prompt_hash TEXT NOT NULL, prompt TEXT NOT NULL,
    response TEXT NOT NULL, rating REAL NOT NULL, correction TEXT, model TEXT, request_id TEXT, response_id TEXT,
    meta TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_prompt ON feedback(prompt_hash);
"""


def prompt_key(messages):
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def check_rating(rating):
    """'up' / 'down' or a finite number -> float; anything else is a ValueError naming it."""
    if isinstance(rating, str) and rating in THUMBS:
        return THUMBS[rating]
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        raise ValueError(f"rating must be 'up', 'down' or a finite number, got {rating!r}")
    return float(rating)


class FeedbackStore:
    def __init__(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self.lock = threading.Lock()   # one connection shared by the server's worker threads
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(FEEDBACK)

    def record(self, prompt, response, rating, model=None, meta=None, correction=None, request_id=None,
               response_id=None):
        """prompt: chat messages (list) or a user text -> row id."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        validate_messages(prompt, "prompt")
        if not isinstance(response, str) or not response.strip():
            raise ValueError("response must be a non-empty string")
        rating = check_rating(rating)
        if correction is not None and (not isinstance(correction, str) or not correction.strip()):
            raise ValueError("correction must be a non-empty string when given")
        with self.lock, self.db:
            cur = self.db.execute(
                "INSERT INTO feedback (prompt_hash, prompt, response, rating, correction, model, request_id, "
                "response_id, meta, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (prompt_key(prompt), json.dumps(prompt, ensure_ascii=False), response, rating, correction, model,
                 request_id, response_id, json.dumps(meta or {}), time.time()))
        return cur.lastrowid

    def rows(self):
        with self.lock:
            cur = self.db.execute("SELECT id, prompt, response, rating, correction, model, request_id, response_id "
                                  "FROM feedback ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) | {"prompt": json.loads(r[1])} for r in cur.fetchall()]

    def __len__(self):
        with self.lock:
            return self.db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]

    def stats(self):
        with self.lock:
            n, prompts, mean = self.db.execute(
                "SELECT COUNT(*), COUNT(DISTINCT prompt_hash), AVG(rating) FROM feedback").fetchone()
            by_model = {m or "?": {"n": c, "mean_rating": round(r, 4)} for m, c, r in
                        self.db.execute("SELECT model, COUNT(*), AVG(rating) FROM feedback GROUP BY model")}
        return {"ratings": n, "prompts": prompts, "mean_rating": round(mean, 4) if mean is not None else None,
                "by_model": by_model}

    def preference_pairs(self, min_margin=1.0, max_pairs_per_prompt=4):
        with self.lock:
            corrected = self.db.execute("SELECT prompt, correction, response FROM feedback WHERE correction IS NOT NULL "
                                        "AND correction != response ORDER BY id").fetchall()
            groups = self.db.execute("SELECT prompt_hash, MIN(prompt) FROM feedback GROUP BY prompt_hash "
                                     "HAVING COUNT(DISTINCT response) > 1 ORDER BY MIN(id)").fetchall()
            rated = {h: self.db.execute("SELECT response, AVG(rating) FROM feedback WHERE prompt_hash=? "
                                        "GROUP BY response ORDER BY AVG(rating) DESC, MIN(id)", (h,)).fetchall()
                     for h, _ in groups}
        pairs = [{"prompt": json.loads(p), "chosen": c, "rejected": r, "margin": None} for p, c, r in corrected]
        for h, prompt in groups:
            ranked = rated[h]
            lo, hi, made = len(ranked) - 1, 0, 0
            while hi < lo and made < max_pairs_per_prompt:   # best vs worst, then inwards
                if ranked[hi][1] - ranked[lo][1] < min_margin:
                    break
                pairs.append({"prompt": json.loads(prompt), "chosen": ranked[hi][0], "rejected": ranked[lo][0],
                              "margin": round(ranked[hi][1] - ranked[lo][1], 4)})
                hi, lo, made = hi + 1, lo - 1, made + 1
        return pairs

    def export_pairs(self, path, min_margin=1.0, max_pairs_per_prompt=4):
        """Write the preference file (atomically) -> number of pairs."""
        pairs = self.preference_pairs(min_margin, max_pairs_per_prompt)
        atomic_write_text(path, "".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")},
                                                   ensure_ascii=False) + "\n" for p in pairs))
        return len(pairs)

    def close(self):
        self.db.close()
