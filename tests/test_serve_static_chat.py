"""serve/static/chat.js run by Node against the real server on 127.0.0.1 (a few lines stand in for the
page's DOM): with its default settings, many turns in a small context all get replies and none fails,
and a reply's thumbs-down lands in the server's feedback database.
Skipped when node is not installed; tests/test_serve_ui.py drives the same page in Chromium."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from quark.feedback import FeedbackStore
from quark.infer.engine import Engine
from quark.serve.server import create_app
from tests.serve_helpers import ServerThread, make_model, make_tokenizer, single_thread  # noqa: F401

NODE = shutil.which("node")
STATIC = Path(__file__).parents[1] / "python" / "quark" / "serve" / "static"

# Elements are plain objects keyed by id; send() is the page's own function, called once per turn.
HARNESS = r"""
const vm = require("vm"), fs = require("fs");
const [base, script, turns, defaults] = process.argv.slice(2);
const els = {}, bubbles = [], bodies = [];
const el = (id) => els[id] || (els[id] = { id, value: "", textContent: "", dataset: {}, appendChild(c) { bubbles.push(c); } });
for (const [id, value] of Object.entries(JSON.parse(defaults))) el(id).value = value;   // chat.html's own settings
const document = { getElementById: el, createElement: () => ({ dataset: {}, children: [], scrollIntoView() {},
  remove() { this.removed = true; }, appendChild(c) { this.children.push(c); }, after(c) { bubbles.push(c); } }) };
const ctx = vm.createContext({ document, TextEncoder, TextDecoder, console, JSON, Number, Math,
  localStorage: { getItem: () => null, setItem() {} },
  fetch: (url, opts) => { if (opts && opts.body) bodies.push(JSON.parse(opts.body)); return fetch(base + url, opts); } });
vm.runInContext(fs.readFileSync(script, "utf8"), ctx);
(async () => {
  for (let i = 0; i < Number(turns); i++) await vm.runInContext(`send("turn ${i}: tell me about the quick brown fox")`, ctx);
  const shown = bubbles.filter((b) => !b.removed && b.className.startsWith("msg"))
    .map((b) => ({ cls: b.className, text: b.textContent, done: b.dataset.done }));
  const bars = bubbles.filter((b) => b.className === "feedback"), last = bars[bars.length - 1];
  await last.children.find((b) => b.className === "thumb down").onclick();   // the user clicks thumbs-down
  const chats = bodies.filter((b) => b.stream);
  console.log(JSON.stringify({ shown, sent: chats.map((b) => b.messages.length), max_tokens: chats.map((b) => b.max_tokens ?? null),
                               rated: bars.length, rating_sent: last.dataset.sent, last_messages: chats[chats.length - 1].messages }));
})();
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_chat_page_defaults_hold_many_turns_in_a_small_context(tmp_path):
    """Before, the page sent max_tokens 128 and the whole history: every message failed against a
    128-token context, and with a smaller max_tokens the second or third turn did."""
    tok = make_tokenizer()
    model = make_model(tok.get_vocab_size(), max_seq_len=128)
    (tmp_path / "harness.js").write_text(HARNESS)
    defaults = dict(re.findall(r'<input id="(\w+)"[^>]*?value="([^"]*)"', (STATIC / "chat.html").read_text()))
    assert "temperature" in defaults
    turns = 8
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    with ServerThread(create_app(Engine(model, tok, max_batch=2), tok, "tiny", feedback=store)) as server:
        out = subprocess.run([NODE, str(tmp_path / "harness.js"), server.url, str(STATIC / "chat.js"), str(turns),
                              json.dumps(defaults)],
                             capture_output=True, text=True, timeout=300, check=True).stdout
    res = json.loads(out)
    assert [b["cls"] for b in res["shown"]] == ["msg user", "msg assistant"] * turns   # no error bubble
    assert all(b["done"] == "1" for b in res["shown"] if b["cls"] == "msg assistant")
    assert set(res["max_tokens"]) == {None}                    # the server fills in what fits
    assert max(res["sent"]) < 2 * turns - 1                     # the oldest turns were left out of later requests
    replies = [b["text"] for b in res["shown"] if b["cls"] == "msg assistant" and b["text"].strip()]
    assert res["rated"] == len(replies) >= 1 and res["rating_sent"] == "down"   # thumbs under every reply
    [row] = store.rows()   # the last reply's thumbs-down, with the turns the model was sent
    assert row["rating"] == 0.0 and row["response"] == replies[-1] and row["prompt"] == res["last_messages"]
    assert row["response_id"].startswith("chatcmpl-") and row["model"] == "tiny"
