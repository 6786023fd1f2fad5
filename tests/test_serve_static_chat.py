"""serve/static/chat.js run by Node against the real server on 127.0.0.1 (a few lines stand in for the
page's DOM): with its default settings, many turns in a small context all get replies and none fails.
Skipped when node is not installed; tests/test_serve_ui.py drives the same page in Chromium."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

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
const document = { getElementById: el, createElement: () => ({ dataset: {}, scrollIntoView() {}, remove() { this.removed = true; } }) };
const ctx = vm.createContext({ document, TextEncoder, TextDecoder, console, JSON, Number, Math,
  localStorage: { getItem: () => null, setItem() {} },
  fetch: (url, opts) => { if (opts && opts.body) bodies.push(JSON.parse(opts.body)); return fetch(base + url, opts); } });
vm.runInContext(fs.readFileSync(script, "utf8"), ctx);
(async () => {
  for (let i = 0; i < Number(turns); i++) await vm.runInContext(`send("turn ${i}: tell me about the quick brown fox")`, ctx);
  const shown = bubbles.filter((b) => !b.removed).map((b) => ({ cls: b.className, text: b.textContent, done: b.dataset.done }));
  console.log(JSON.stringify({ shown, sent: bodies.filter((b) => b.messages).map((b) => b.messages.length),
                               max_tokens: bodies.filter((b) => b.messages).map((b) => b.max_tokens ?? null) }));
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
    with ServerThread(create_app(Engine(model, tok, max_batch=2), tok, "tiny")) as server:
        out = subprocess.run([NODE, str(tmp_path / "harness.js"), server.url, str(STATIC / "chat.js"), str(turns),
                              json.dumps(defaults)],
                             capture_output=True, text=True, timeout=300, check=True).stdout
    res = json.loads(out)
    assert [b["cls"] for b in res["shown"]] == ["msg user", "msg assistant"] * turns   # no error bubble
    assert all(b["done"] == "1" for b in res["shown"] if b["cls"] == "msg assistant")
    assert set(res["max_tokens"]) == {None}                    # the server fills in what fits
    assert max(res["sent"]) < 2 * turns - 1                     # the oldest turns were left out of later requests
