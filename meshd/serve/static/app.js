// meshd's live page: renders the daemon's /events snapshots and chats through its /v1/chat/completions.
// No framework and no build step; everything it loads comes from the daemon that served it.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY = 120; // points kept in the throughput figure
const COLOURS = ["#e07a1f", "#2f9e6e", "#8a5cd6", "#d04a6a", "#3a8fc9", "#b59a12"];

let apiKey = localStorage.getItem("meshd-api-key") || "";
const history = []; // {tps, busy: {node: fraction}}
let stageOrder = [];

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey) h.Authorization = "Bearer " + apiKey;
  return h;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

const short = (id) => String(id || "?").slice(0, 8);
const num = (v, digits) => (typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "–");

function bytes(n) {
  if (typeof n !== "number") return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(n >= 10 || i === 0 ? 0 : 1) + " " + units[i];
}

// ---- server-sent events over fetch (EventSource cannot send the API key) ----------------------
async function followEvents() {
  for (;;) {
    try {
      const resp = await fetch("/events", { headers: headers(), cache: "no-store" });
      if (resp.status === 401) { askForKey(); return; }
      if (!resp.ok) throw new Error("/events answered " + resp.status);
      document.body.dataset.connected = "yes";
      for await (const ev of sse(resp)) if (ev.event === "mesh") render(JSON.parse(ev.data));
    } catch (err) {
      console.warn("live feed:", err);
    }
    document.body.dataset.connected = "no";
    $("state").textContent = "disconnected";
    $("state").className = "pill bad";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

async function* sse(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = { event: "message", data: "" };
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) ev.event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      ev.data = data.join("\n");
      yield ev;
    }
  }
}

function askForKey() {
  $("key-section").hidden = false;
  $("state").textContent = "API key needed";
  $("state").className = "pill bad";
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = $("key-input").value.trim();
  localStorage.setItem("meshd-api-key", apiKey);
  $("key-section").hidden = true;
  followEvents();
});

// ---- rendering ------------------------------------------------------------------------------
function render(snap) {
  $("model").textContent = (snap.model || "?") + (snap.version ? "  ·  meshd " + snap.version : "");
  $("node").textContent = "node " + short(snap.node_id);
  $("state").textContent = snap.ready ? "serving" : "not ready: " + (snap.reason || "?");
  $("state").className = "pill " + (snap.ready ? "ok" : "bad");
  $("epoch").textContent = snap.epoch != null ? "plan epoch " + snap.epoch + ", " + snap.n_layers + " layers" : "";
  renderRing(snap);
  renderRequests(snap);
  pushHistory(snap);
  drawFigure();
}

function renderRing(snap) {
  const ring = $("ring");
  const stages = snap.stages || [];
  stageOrder = stages.map((s) => s.node_id);
  ring.dataset.stages = String(stages.length);
  ring.replaceChildren();
  $("ring-note").textContent = stages.length
    ? "Activations flow left to right; the last stage's output returns to whichever peer originated the request."
    : "No committed plan yet" + (snap.plan_error ? ": " + snap.plan_error : snap.reason ? ": " + snap.reason : ".");
  const n = snap.n_layers || 1;
  stages.forEach((s, i) => {
    const st = s.stage || {};
    const busy = typeof st.busy === "number" ? st.busy : st.utilisation;
    const me = s.node_id === snap.node_id;
    // round trip and bytes as this daemon's mesh link to the peer measured them
    const lb = s.link_bytes;
    const link = me ? "this daemon" : s.link === "up"
      ? "link up" + (s.rtt_ms != null ? ", rtt " + num(s.rtt_ms, 2) + " ms" : "") + (lb ? ", " + bytes(lb.sent) + " out / " + bytes(lb.received) + " in" : "")
      : s.link || "?";
    const linkClass = me || s.link === "up" ? (s.error ? "warn" : "ok") : "bad";
    const colour = COLOURS[i % COLOURS.length];
    const card = el("div", { class: "stage" + (me ? " me" : ""), "data-node": s.node_id, style: "border-top-color:" + colour },
      el("div", { class: "stage-head" }, el("b", {}, "stage " + (i + 1)), el("span", { class: "muted" }, short(s.node_id))),
      el("div", { class: "layers", textContent: "layers " + s.first_layer + "–" + (s.stop_layer - 1) + " (" + (s.stop_layer - s.first_layer) + ")" }),
      el("div", { class: "bar layerbar" }, el("span", { style: `left:${(100 * s.first_layer) / n}%;width:${(100 * (s.stop_layer - s.first_layer)) / n}%;background:${colour}` })),
      el("div", { class: "kv" }, "busy ", el("b", { class: "busy" }, busy == null ? "–" : num(100 * busy, 0) + "%")),
      el("div", { class: "bar" }, el("span", { style: `width:${Math.round(100 * (busy || 0))}%;background:${colour}` })),
      el("div", { class: "kv" }, "queue ", el("b", { class: "queue" }, String(st.queued_rows ?? "–")), " rows · ", String(st.sessions ?? "–"), " sessions"),
      el("div", { class: "kv" }, "memory ", el("b", {}, bytes(s.memory_rss)), " of ", bytes(s.memory_budget), " offered"),
      el("div", { class: "kv link " + linkClass, title: s.error || "" }, link + (s.error ? " (" + s.error + ")" : "")),
    );
    ring.append(card);
    if (i < stages.length - 1) ring.append(el("div", { class: "arrow", textContent: "→" }));
  });
  if (stages.length > 1) ring.append(el("div", { class: "arrow back", textContent: "↺" }));
}

function renderRequests(snap) {
  const rows = [...(snap.requests || []), ...(snap.recent_requests || [])];
  const body = $("requests").tBodies[0];
  body.replaceChildren();
  $("requests-empty").hidden = rows.length > 0;
  $("requests").dataset.live = String((snap.requests || []).length);
  for (const r of rows) {
    const live = !r.finish_reason;
    body.append(el("tr", { class: live ? "live" : "" },
      el("td", {}, String(r.request_id).slice(-6)),
      el("td", {}, short(r.origin)),
      el("td", {}, r.mode || "–"),
      el("td", {}, String(r.new_tokens)),
      el("td", {}, num(r.tokens_per_s, 1)),
      el("td", {}, num(r.accepted_per_round, 2)),
      el("td", {}, live ? "running" : r.finish_reason),
    ));
  }
}

function pushHistory(snap) {
  const busy = {};
  for (const s of snap.stages || []) {
    const st = s.stage || {};
    busy[s.node_id] = typeof st.busy === "number" ? st.busy : null;
  }
  history.push({ tps: typeof snap.tokens_per_s === "number" ? snap.tokens_per_s : null, busy });
  while (history.length > HISTORY) history.shift();
  const last = history[history.length - 1].tps;
  $("throughput-now").textContent = last == null ? "" : num(last, 1) + " tokens/s now";
}

function drawFigure() {
  const c = $("throughput");
  const ctx = c.getContext("2d");
  const w = c.width, h = c.height, pad = 24;
  ctx.clearRect(0, 0, w, h);
  const peak = Math.max(1, ...history.map((p) => p.tps || 0));
  const x = (i) => pad + ((w - 2 * pad) * i) / (HISTORY - 1);
  ctx.strokeStyle = "#ccc";
  ctx.strokeRect(pad, 4, w - 2 * pad, h - pad);
  ctx.fillStyle = "#888";
  ctx.font = "11px sans-serif";
  ctx.fillText(num(peak, 0) + " tok/s", 2, 14);
  ctx.fillText("busy 100%", w - pad - 52, 14);
  const y = (v) => 4 + (h - pad) * (1 - v);
  const line = (values, colour, width) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.beginPath();
    let on = false;
    values.forEach((v, i) => {
      if (v == null) { on = false; return; }
      const px = x(i + HISTORY - values.length), py = y(v);
      on ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
      on = true;
    });
    ctx.stroke();
  };
  stageOrder.forEach((node, i) => line(history.map((p) => p.busy[node] ?? null), COLOURS[i % COLOURS.length], 1));
  line(history.map((p) => (p.tps == null ? null : p.tps / peak)), "#1b4f8a", 2.5);
  c.dataset.points = String(history.length);
  c.dataset.last = String(history[history.length - 1]?.tps ?? "");
  c.dataset.peak = String(Math.max(0, ...history.map((p) => p.tps || 0)));
  $("busy-legend").replaceChildren(...stageOrder.map((node, i) =>
    el("span", {}, el("span", { class: "swatch", style: "background:" + COLOURS[i % COLOURS.length] }), "stage " + (i + 1) + " busy ")));
}

// ---- chat -----------------------------------------------------------------------------------
let messages = [];

function bubble(role, text) {
  const b = el("div", { class: "msg " + role }, el("div", { class: "text", textContent: text }));
  $("chat-log").append(b);
  b.scrollIntoView({ block: "end" });
  return b;
}

async function send(question) {
  messages.push({ role: "user", content: question });
  bubble("user", question);
  const answer = bubble("assistant", "");
  const text = answer.querySelector(".text");
  const speed = el("div", { class: "speed muted", textContent: "waiting for the first token…" });
  answer.append(speed);
  answer.dataset.state = "streaming";
  $("chat-send").disabled = true;
  const t0 = performance.now();
  let first = null, stats = null, usage = null, finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({
        messages,
        stream: true,
        stream_options: { include_usage: true },
        mode: $("chat-mode").value,
        max_tokens: Number($("chat-max").value) || 128,
        temperature: Number($("chat-temp").value) || 0,
      }),
    });
    if (!resp.ok) {
      const body = await resp.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "the daemon answered " + resp.status);
    }
    for await (const ev of sse(resp)) {
      if (ev.data === "[DONE]") break;
      const data = JSON.parse(ev.data);
      if (data.error) throw new Error(data.error.message || "the stream failed");
      for (const ch of data.choices || []) {
        const delta = ch.delta && ch.delta.content;
        if (delta) {
          if (first === null) first = performance.now();
          text.textContent += delta;
          speed.textContent = `streaming… ${num((performance.now() - t0) / 1000, 1)} s`;
        }
        if (ch.finish_reason) finish = ch.finish_reason;
      }
      if (data.usage) usage = data.usage;
      if (data.meshd) stats = data.meshd;
    }
    const end = performance.now();
    messages.push({ role: "assistant", content: text.textContent });
    const n = (usage && usage.completion_tokens) || (stats && stats.new_tokens) || 0;
    const seen = first === null ? 0 : (end - t0) / 1000;
    speed.textContent =
      `${n} tokens in ${num(seen, 2)} s · ${num(seen > 0 ? n / seen : 0, 1)} tokens/s here` +
      (stats ? ` · ${num(stats.tokens_per_s, 1)} tokens/s in the mesh · ${num(stats.mean_accepted, 2)} accepted/round over ${stats.rounds} rounds (${stats.mode})` : "") +
      (first !== null ? ` · first token after ${num((first - t0) / 1000, 2)} s` : "") +
      (finish ? ` · ${finish}` : "");
    answer.dataset.state = "done";
    answer.dataset.tokens = String(n);
  } catch (err) {
    speed.textContent = "error: " + err.message;
    speed.className = "speed bad";
    answer.dataset.state = "error";
    messages.pop();
  } finally {
    $("chat-send").disabled = false;
  }
}

$("chat-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("chat-input").value.trim();
  if (!q) return;
  $("chat-input").value = "";
  send(q);
});
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
});
$("chat-reset").addEventListener("click", () => { messages = []; $("chat-log").replaceChildren(); });

followEvents();
