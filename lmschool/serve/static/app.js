// lmschool serve: the page's behaviour. Plain JavaScript, no framework, no build step.
// It speaks the server's OpenAI API (/v1/chat/completions, streamed as server-sent events) and
// its three helpers: /api/info (models, report), /api/score (the teacher), /api/report.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], chat: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || localStorage.getItem("lmschool-key") || "";
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, body) {
  const r = await fetch(path, body === undefined ? { headers: headers() }
                                                 : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

// Stream a chat completion: onDelta(text) per piece; resolves to {text, finish, usage}.
async function streamChat(body, onDelta, signal) {
  const r = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    const error = new Error((data.error && data.error.message) || r.statusText);
    error.code = data.error && data.error.code;
    throw error;
  }
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", text = "", finish = null, usage = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return { text, finish, usage };
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices) {
        const piece = choice.delta && choice.delta.content;
        if (piece) { text += piece; onDelta(piece); }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    }
  }
  return { text, finish, usage };
}

// ---- chat ---------------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("chat-log").appendChild(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || state.controller) return;
  $("chat-input").value = "";
  addMessage("user", text);
  state.chat.push({ role: "user", content: text });
  const system = $("chat-system").value.trim();
  const out = addMessage("assistant", "");
  out.dataset.chunks = "0";
  state.controller = new AbortController();
  $("chat-send").disabled = true; $("chat-stop").hidden = false;
  try {
    const maxTokens = $("chat-max-tokens").value ? Number($("chat-max-tokens").value) : undefined;
    let result;
    for (;;) {   // when the conversation outgrows the context, drop the oldest turns (as `lmschool chat`)
      const messages = (system ? [{ role: "system", content: system }] : []).concat(state.chat);
      try {
        result = await streamChat({
          model: $("chat-model").value, messages, temperature: Number($("chat-temperature").value),
          max_tokens: maxTokens,
        }, (piece) => { out.textContent += piece; out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
                        $("chat-log").scrollTop = $("chat-log").scrollHeight; }, state.controller.signal);
        break;
      } catch (e) {
        if (e.code !== "context_length_exceeded" || state.chat.length <= 1) throw e;
        state.chat.splice(0, Math.min(2, state.chat.length - 1));
      }
    }
    state.chat.push({ role: "assistant", content: result.text.trim() || "..." });
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${$("chat-model").value} · ${result.usage ? result.usage.completion_tokens : "?"} tokens · ${result.finish}`;
    out.appendChild(meta);
    out.dataset.done = "1";
  } catch (e) {
    state.chat.pop();
    if (e.name === "AbortError") { out.dataset.done = "1"; }
    else { out.className = "msg error"; out.textContent = e.message; out.dataset.done = "1"; }
  } finally {
    state.controller = null;
    $("chat-send").disabled = false; $("chat-stop").hidden = true;
  }
}

// ---- compare ------------------------------------------------------------------------------------

function scoreClass(s) { return s >= 0.8 ? "score good" : s < 0.5 ? "score poor" : "score"; }

async function runCompare(event) {
  event.preventDefault();
  const prompt = $("compare-input").value.trim();
  const chosen = [...document.querySelectorAll("#compare-models input:checked")].map((c) => c.value);
  if (!prompt || !chosen.length) return;
  $("compare-run").disabled = true;
  $("compare-out").innerHTML = "";
  const messages = [{ role: "user", content: prompt }];
  const jobs = chosen.map(async (model) => {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.model = model;
    card.innerHTML = `<h3><span></span><span class="score" title="teacher score">…</span></h3><div class="answer"></div><div class="parts"></div>`;
    card.querySelector("h3 span").textContent = model;
    $("compare-out").appendChild(card);
    const answer = card.querySelector(".answer"), badge = card.querySelector(".score");
    try {
      const result = await streamChat({
        model, messages, temperature: Number($("compare-temperature").value),
        seed: Number($("compare-seed").value), max_tokens: Number($("compare-max-tokens").value),
      }, (piece) => { answer.textContent += piece; });
      const info = state.models.find((m) => m.id === model);
      if (info && info.world) {
        const scored = await api("/api/score", { model, messages, responses: [result.text] });
        const s = scored.scores[0];
        badge.textContent = s.score.toFixed(2);
        badge.className = scoreClass(s.score);
        const parts = Object.entries(s.parts).map(([k, v]) => `${k} ${Number(v).toFixed(2)}`).join(" · ");
        card.querySelector(".parts").textContent = parts + (s.flaws.length ? ` · flaws: ${s.flaws.join(", ")}` : "");
      } else {
        badge.textContent = "no world";
        badge.title = "no school world is known for this model, so there is no teacher score";
      }
    } catch (e) {
      answer.className = "answer error";
      answer.textContent = e.message;
      badge.textContent = "error";
    }
    card.dataset.done = "1";
  });
  await Promise.all(jobs);
  $("compare-run").disabled = false;
  $("compare-out").dataset.done = "1";
}

// ---- report: a small Markdown renderer for what report.md uses ----------------------------------

function esc(s) { return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;"); }

function inline(s) {
  return esc(s)
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/!\[([^\]]*)\]\(([^)\s]+)\)/g, (_, alt, src) =>
      `<img alt="${alt}" data-src="${/^(https?:|\/)/.test(src) ? src : "/report/" + src}">`)
    .replace(/\[([^\]]+)\]\(([^)\s]+)\)/g, '<a href="$2">$1</a>')
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[\s(])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
}

function markdown(text) {
  const lines = text.split("\n"), html = [];
  for (let i = 0; i < lines.length;) {
    const line = lines[i];
    if (/^```/.test(line)) {
      const code = [];
      for (i++; i < lines.length && !/^```/.test(lines[i]); i++) code.push(lines[i]);
      html.push(`<pre><code>${esc(code.join("\n"))}</code></pre>`); i++;
    } else if (/^#{1,6} /.test(line)) {
      const level = line.match(/^#+/)[0].length;
      html.push(`<h${level}>${inline(line.slice(level + 1))}</h${level}>`); i++;
    } else if (/^\|/.test(line)) {
      const rows = [];
      for (; i < lines.length && /^\|/.test(lines[i]); i++) rows.push(lines[i]);
      const cells = (row) => row.replace(/^\||\|$/g, "").split("|").map((c) => c.trim());
      const body = rows.filter((r, k) => !(k === 1 && /^\|[\s:|-]+\|$/.test(r)));
      html.push("<table>" + body.map((r, k) => "<tr>" + cells(r).map((c) =>
        k === 0 ? `<th>${inline(c)}</th>` : `<td>${inline(c)}</td>`).join("") + "</tr>").join("") + "</table>");
    } else if (/^\s*[-*] /.test(line)) {
      const items = [];
      for (; i < lines.length && /^\s*[-*] /.test(lines[i]); i++) items.push(`<li>${inline(lines[i].replace(/^\s*[-*] /, ""))}</li>`);
      html.push(`<ul>${items.join("")}</ul>`);
    } else if (!line.trim()) {
      i++;
    } else {
      const para = [];
      for (; i < lines.length && lines[i].trim() && !/^(#|\||```|\s*[-*] )/.test(lines[i]); i++) para.push(lines[i]);
      html.push(`<p>${inline(para.join(" "))}</p>`);
    }
  }
  return html.join("\n");
}

async function loadReport() {
  const body = $("report-body");
  if (body.dataset.loaded) return;
  try {
    const data = await api("/api/report");
    body.innerHTML = markdown(data.markdown);
    // images through fetch, so that an API key reaches them too
    for (const img of body.querySelectorAll("img[data-src]")) {
      const r = await fetch(img.dataset.src, { headers: headers() });
      if (r.ok) img.src = URL.createObjectURL(await r.blob());
    }
    body.dataset.loaded = "1";
  } catch (e) {
    body.textContent = "The report could not be loaded: " + e.message;
  }
}

// ---- views and start ----------------------------------------------------------------------------

function show(view) {
  for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === view);
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== view;
  if (view === "report") loadReport();
}

async function start() {
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => show(tab.dataset.view));
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("chat-reset").addEventListener("click", () => { state.chat = []; $("chat-log").innerHTML = ""; });
  $("compare-form").addEventListener("submit", runCompare);
  $("api-key").addEventListener("change", () => { localStorage.setItem("lmschool-key", $("api-key").value); location.reload(); });
  const health = await (await fetch("/health")).json();
  $("key-box").hidden = !health.auth;
  let info;
  try { info = await api("/api/info"); } catch (e) { $("status").textContent = e.message; return; }
  state.models = info.models;
  const chatModels = info.models.filter((m) => m.chat);
  $("chat-model").innerHTML = "";
  for (const m of chatModels) $("chat-model").add(new Option(m.id, m.id));
  const preferred = chatModels.find((m) => m.id === "sft") || chatModels[0];
  if (preferred) $("chat-model").value = preferred.id;
  $("compare-models").innerHTML = "";
  const defaults = new Set(["sft", "dpo", "ppo", "grpo"]);
  const anyDefault = chatModels.some((m) => defaults.has(m.id));
  for (const [k, m] of chatModels.entries()) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.value = m.id; box.checked = anyDefault ? defaults.has(m.id) : k < 2;
    label.append(box, " " + m.id);
    $("compare-models").appendChild(label);
  }
  $("compare-note").textContent = info.models.some((m) => m.world)
    ? "Scores: the school world's teacher (0-1: right facts, politeness, brevity, refusals with a reason, a well-formed end)."
    : "No school world is known for these models, so answers are not scored.";
  $("report-tab").hidden = !info.report;
  $("status").textContent = `${info.models.length} model${info.models.length === 1 ? "" : "s"}` + (info.run ? ` · ${info.run}` : "");
  document.body.dataset.ready = "1";
  if (location.pathname === "/report" && info.report) show("report");
}

start();
