// Chat page: keeps the conversation client-side, streams replies from /v1/chat/completions (SSE);
// thumbs up/down under a finished reply post the rating to /v1/feedback.
const $ = (id) => document.getElementById(id);
const history = [];
let model = null;

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
  if (r.ok) { model = (await r.json()).data[0].id; $("model").textContent = model; }
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
  const prompt = history.slice();
  try {
    if (!model) await loadModel();
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model, messages: history, stream: true,
        temperature: Number($("temperature").value), max_tokens: Number($("max_tokens").value) }),
    });
    if (!r.ok) throw new Error((await r.json()).error.message);
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
        responseId = msg.id;
        reply += msg.choices[0].delta.content || "";
        out.textContent = reply;
      }
    }
    history.push({ role: "assistant", content: reply });
    out.dataset.done = "1";
    if (reply.trim()) thumbs(out, prompt, reply, responseId);
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
