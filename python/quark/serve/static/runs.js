// Runs page: one SVG line chart per metric of each step's metrics.jsonl (from /api/runs/NAME).
const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, parent) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

const fmt = (v) => (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-2 && v !== 0)) ? v.toExponential(2) : +v.toPrecision(4);

function chart(title, points) {
  const W = 420, H = 200, L = 48, R = 8, T = 8, B = 22;
  const box = document.createElement("div");
  box.className = "chart";
  const h = document.createElement("h3");
  h.textContent = title + "  (last " + fmt(points[points.length - 1][1]) + ")";
  box.appendChild(h);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" }, box);
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const sx = (x) => L + (W - L - R) * (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5);
  const sy = (y) => T + (H - T - B) * (y1 > y0 ? 1 - (y - y0) / (y1 - y0) : 0.5);
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    el("line", { x1: L, x2: W - R, y1: sy(y), y2: sy(y) }, svg);
    el("text", { x: 2, y: sy(y) + 3 }, svg).textContent = fmt(y);
  }
  el("text", { x: L, y: H - 6 }, svg).textContent = "step " + fmt(x0);
  el("text", { x: W - R - 60, y: H - 6 }, svg).textContent = "step " + fmt(x1);
  el("path", { d: points.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ") }, svg);
  return box;
}

// the API key the chat page stored, when the server requires one
const key = localStorage.getItem("quark_api_key");
const auth = key ? { headers: { Authorization: "Bearer " + key } } : {};

async function show(name) {
  const r = await fetch("/api/runs/" + encodeURIComponent(name), auth);
  const data = await r.json();
  $("charts").textContent = "";
  let n = 0;
  for (const [step, series] of Object.entries(data.steps)) {
    for (const [metric, points] of Object.entries(series)) {
      if (points.length) { $("charts").appendChild(chart(step + " / " + metric, points)); n++; }
    }
  }
  $("status").textContent = n ? `${name}: ${n} metrics` : `${name}: no metrics yet`;
}

async function init() {
  const r = await fetch("/api/runs", auth);
  if (r.status === 401) { $("status").textContent = "this server needs an API key: enter it on the chat page"; return; }
  const runs = (await r.json()).runs;
  if (!runs.length) { $("status").textContent = "no runs with metrics.jsonl found"; return; }
  for (const name of runs) $("run").add(new Option(name, name));
  $("run").onchange = () => show($("run").value);
  show(runs[0]);
}
init();
