// Chat page: keeps the conversation client-side, streams replies from /v1/chat/completions (SSE);
// thumbs up/down under a finished reply post the rating to /v1/feedback.
// Out of the box the page never fails on its own defaults: max_tokens is left to the server (which
// fills in what the context leaves) unless set, and only the newest turns that fit are sent (below).
const $ = (id) => document.getElementById(id);
const history = [];
let model = null;
let contextLength = null;   // from /v1/models
let tokensPerByte = 1;      // measured from each reply's usage; 1 (a byte-level tokenizer's bound) at first

$("api_key").value = localStorage.getItem("quark_api_key") || "";
$("api_key").onchange = () => localStorage.setItem("quark_api_key", $("api_key").value);

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api_key").value) h["Authorization"] = "Bearer " + $("api_key").value;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.ok) {
    const m = (await r.json()).data[0];
    model = m.id; contextLength = m.context_length; $("model").textContent = model;
  }
}

// The messages to send: the newest turns whose estimated tokens fill at most 3/4 of the context (the rest is
// for the reply), less `extra` more of the oldest turns after the server answered context_length_exceeded.
const bytesOf = (msgs) => msgs.reduce((n, m) => n + new TextEncoder().encode(m.content).length + 8, 0);
function fitted(extra) {
  let start = 0;   // history alternates user, assistant, ... and ends with the new user message
  while (contextLength && start < history.length - 1 &&
         bytesOf(history.slice(start)) * tokensPerByte > contextLength * 3 / 4) start += 2;
  return history.slice(Math.min(start + 2 * extra, history.length - 1));
}

function thumbs(out, prompt, reply, responseId) {
  const bar = document.createElement("div");
  bar.className = "feedback";
  for (const [rating, label] of [["up", "\u{1F44D}"], ["down", "\u{1F44E}"]]) {
    const b = document.createElement("button");
    b.className = "thumb " + rating;
    b.textContent = label;
    b.title = "rate this reply " + rating;
    b.onclick = async () => {
      const r = await fetch("/v1/feedback", {
        method: "POST", headers: headers(),
        body: JSON.stringify({ messages: prompt, response: reply, rating, response_id: responseId }),
      });
      bar.textContent = r.ok ? "thanks (" + rating + ")" : "feedback failed: " + (await r.json()).error.message;
      bar.dataset.sent = r.ok ? rating : "error";
    };
    bar.appendChild(b);
  }
  out.after(bar);
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  $("send").disabled = true;
  let reply = "", responseId = null;
  try {
    if (!model) await loadModel();
    let r, sent;
    for (let extra = 0; ; extra++) {
      sent = fitted(extra);
      const max = Number($("max_tokens").value);   // empty: the server's default, clamped to what fits
      r = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(),
        body: JSON.stringify({ model, messages: sent, stream: true, stream_options: { include_usage: true },
          temperature: Number($("temperature").value), ...(max > 0 ? { max_tokens: max } : {}) }),
      });
      if (r.ok) break;
      const err = (await r.json()).error;
      if (err.code !== "context_length_exceeded" || sent.length === 1) throw new Error(err.message);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      const events = buf.split("\n\n");
      buf = events.pop();  // an incomplete event waits for the next read
      for (const ev of events) {
        const data = ev.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (msg.error) throw new Error(msg.error.message);
        if (msg.usage) tokensPerByte = msg.usage.prompt_tokens / bytesOf(sent);
        if (!msg.choices.length) continue;   // the usage chunk
        responseId = msg.id;
        reply += msg.choices[0].delta.content || "";
        out.textContent = reply;
      }
    }
    history.push({ role: "assistant", content: reply });
    out.dataset.done = "1";
    if (reply.trim()) thumbs(out, sent, reply, responseId);   // rated with the turns the model saw
  } catch (e) {
    history.pop();
    out.remove();
    bubble("error", String(e.message || e));
  } finally {
    $("send").disabled = false;
  }
}

$("form").onsubmit = (e) => {
  e.preventDefault();
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  send(text);
};
$("input").onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("form").requestSubmit(); }
};
$("clear").onclick = () => { history.length = 0; $("messages").textContent = ""; };
loadModel();
