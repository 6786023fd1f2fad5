"""Feedback loop: store ratings of model responses and turn them into preference pairs for DPO.

Ratings (any scale: thumbs 0/1, stars 1-5) are kept in SQLite with the prompt (chat messages), the
response and the model that wrote it. preference_pairs() groups ratings by prompt, averages repeated
ratings of the same response, and pairs a better response with a worse one when their mean ratings
differ by at least `min_margin` (best against worst first, each response used at most once per
prompt, so one strong answer does not dominate the set). Output records, one per line of the JSONL
file the alignment step's DPO reads:
    {"prompt": [messages], "chosen": str, "rejected": str}
"""
import hashlib
import json
import sqlite3
import time
from pathlib import Path

from quark.chat import validate_messages
from quark.io import atomic_write_text

FEEDBACK = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, prompt_hash TEXT NOT NULL, prompt TEXT NOT NULL,
    response TEXT NOT NULL, rating REAL NOT NULL, model TEXT, meta TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_prompt ON feedback(prompt_hash);
"""


def prompt_key(messages):
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class FeedbackStore:
    def __init__(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(FEEDBACK)

    def record(self, prompt, response, rating, model=None, meta=None):
        """prompt: chat messages (list) or a user text; rating: a finite number -> row id."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        validate_messages(prompt, "prompt")
        if not isinstance(response, str) or not response.strip():
            raise ValueError("response must be a non-empty string")
        if isinstance(rating, bool) or not isinstance(rating, (int, float)) or rating != rating or abs(rating) == float("inf"):
            raise ValueError(f"rating must be a finite number, got {rating!r}")
        with self.db:
            cur = self.db.execute("INSERT INTO feedback (prompt_hash, prompt, response, rating, model, meta, created) "
                                  "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                  (prompt_key(prompt), json.dumps(prompt, ensure_ascii=False), response, float(rating),
                                   model, json.dumps(meta or {}), time.time()))
        return cur.lastrowid

    def __len__(self):
        return self.db.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]

    def stats(self):
        n, prompts, mean = self.db.execute("SELECT COUNT(*), COUNT(DISTINCT prompt_hash), AVG(rating) FROM feedback").fetchone()
        by_model = {m or "?": {"n": c, "mean_rating": round(r, 4)} for m, c, r in
                    self.db.execute("SELECT model, COUNT(*), AVG(rating) FROM feedback GROUP BY model")}
        return {"ratings": n, "prompts": prompts, "mean_rating": round(mean, 4) if mean is not None else None,
                "by_model": by_model}

    def preference_pairs(self, min_margin=1.0, max_pairs_per_prompt=4):
        pairs = []
        groups = self.db.execute("SELECT prompt_hash, MIN(prompt) FROM feedback GROUP BY prompt_hash "
                                 "HAVING COUNT(DISTINCT response) > 1 ORDER BY MIN(id)").fetchall()
        for h, prompt in groups:
            rated = self.db.execute("SELECT response, AVG(rating) FROM feedback WHERE prompt_hash=? "
                                    "GROUP BY response ORDER BY AVG(rating) DESC, MIN(id)", (h,)).fetchall()
            lo, hi, made = len(rated) - 1, 0, 0
            while hi < lo and made < max_pairs_per_prompt:   # best vs worst, then inwards
                if rated[hi][1] - rated[lo][1] < min_margin:
                    break
                pairs.append({"prompt": json.loads(prompt), "chosen": rated[hi][0], "rejected": rated[lo][0],
                              "margin": round(rated[hi][1] - rated[lo][1], 4)})
                hi, lo, made = hi + 1, lo - 1, made + 1
        return pairs

    def export_pairs(self, path, min_margin=1.0, max_pairs_per_prompt=4):
        """Write the DPO preference file (atomically) -> number of pairs."""
        pairs = self.preference_pairs(min_margin, max_pairs_per_prompt)
        atomic_write_text(path, "".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")},
                                                   ensure_ascii=False) + "\n" for p in pairs))
        return len(pairs)

    def close(self):
        self.db.close()
