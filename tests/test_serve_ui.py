"""The web UI in headless Chromium (Debian's `chromium` package), driven over the DevTools protocol:
the chat page renders, a typed message streams back the model's reply, and the runs page plots the
run's metrics. Screenshots are checked to be real renders. Skipped when chromium is not installed
(CI: `apt-get update && apt-get install -y chromium`)."""
import asyncio
import base64
import json
import shutil
import subprocess
import time

import aiohttp
import pytest

from quark.chat import encode_chat
from quark.feedback import FeedbackStore
from quark.infer.engine import Engine
from quark.infer.sampling import SamplingParams
from quark.serve.server import create_app
from tests.serve_helpers import ServerThread, make_model, make_tokenizer, single_thread  # noqa: F401

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")


class Browser:
    """Headless Chromium with a fresh profile, one page, and a minimal DevTools protocol client."""

    def __init__(self, profile):
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1100,800", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        self.next_id = 0

    async def connect(self):
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{self.port}/json/list") as r:
            page = next(t for t in await r.json() if t["type"] == "page")
        self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)

    async def send(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_json({"id": my_id, "method": method, "params": params})
        while True:
            msg = json.loads((await self.ws.receive(timeout=60)).data)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def eval(self, js):
        r = await self.send("Runtime.evaluate", expression=js, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{js}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def wait_for(self, js, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = await self.eval(js)
            if value:
                return value
            await asyncio.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {js}")

    async def goto(self, url):
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def screenshot(self, path):
        png = base64.b64decode((await self.send("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(png)
        return png

    async def close(self):
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        self.proc.wait(30)


def png_size(png):
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


@pytest.mark.slow
def test_chat_and_runs_pages_in_chromium(tmp_path):
    tok = make_tokenizer()
    model = make_model(tok.get_vocab_size())
    runs = tmp_path / "runs" / "exp1" / "pretrain"
    runs.mkdir(parents=True)
    (runs / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 6 * 0.9 ** i, "tokens_per_s": 1000 + i})
                                                + "\n" for i in range(30)))
    messages = [{"role": "user", "content": "Hello from Chromium"}]
    ids, _ = encode_chat(tok, messages, add_generation_prompt=True)
    ref = Engine(model, tok, max_batch=1)
    want = ref.generate(ids, SamplingParams(max_tokens=24, temperature=0)).text
    ref.shutdown()
    assert want

    engine = Engine(model, tok, max_batch=4)
    store = FeedbackStore(tmp_path / "feedback.sqlite")
    with ServerThread(create_app(engine, tok, "tiny", runs_dir=tmp_path / "runs", feedback=store)) as server:
        async def drive():
            browser = Browser(tmp_path / "profile")
            try:
                await browser.connect()
                await browser.send("Page.enable")
                await browser.goto(server.url + "/")
                assert await browser.wait_for("document.getElementById('model').textContent") == "tiny"
                await browser.eval("document.getElementById('temperature').value = '0';"
                                   "document.getElementById('max_tokens').value = '24';"
                                   "document.getElementById('input').focus()")
                await browser.send("Input.insertText", text="Hello from Chromium")
                await browser.send("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter",
                                   windowsVirtualKeyCode=13, text="\r")
                await browser.send("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)
                reply = await browser.wait_for(
                    "(() => { const m = document.querySelector('.msg.assistant[data-done=\"1\"]'); return m && m.textContent; })()")
                assert await browser.eval("document.querySelector('.msg.user').textContent") == "Hello from Chromium"
                await browser.eval("document.querySelector('.feedback .thumb.down').click()")
                assert await browser.wait_for("document.querySelector('.feedback').dataset.sent") == "down"
                png = await browser.screenshot(tmp_path / "chat.png")
                width, height = png_size(png)
                assert width == 1100 and height > 400 and len(png) > 5000

                await browser.goto(server.url + "/runs")
                n = await browser.wait_for("document.querySelectorAll('.chart path').length")
                status = await browser.eval("document.getElementById('status').textContent")
                png2 = await browser.screenshot(tmp_path / "runs.png")
                assert len(png2) > 5000
                return reply, n, status
            finally:
                await browser.close()

        reply, n_charts, status = asyncio.run(drive())
    assert reply == want            # the streamed reply equals the engine's own greedy output
    [row] = store.rows()            # the thumbs-down landed in the database with the conversation it rates
    assert row["prompt"] == messages and row["response"] == want and row["rating"] == 0.0
    assert row["response_id"].startswith("chatcmpl-") and row["model"] == "tiny"
    assert n_charts == 2 and status == "exp1: 2 metrics"
