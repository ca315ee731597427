// tunelab board: the page's four views over the board's JSON API (tunelab/board/app.py).
"use strict";

const COLORS = ["#2f6fde", "#e8590c", "#2b8a3e", "#ae3ec9", "#c92a2a", "#0b7285", "#5c940d", "#862e9c"];
const state = { fields: [], runs: [], watched: new Set(), metrics: {}, focus: null, compared: null };
const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value; else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
};

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await response.json().catch(() => ({ errors: { form: `HTTP ${response.status}` } }));
  return { ok: response.ok, data };
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (value !== 0 && (Math.abs(value) < 1e-3 || Math.abs(value) >= 1e5)) return value.toExponential(2);
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// --- views -------------------------------------------------------------------------------
function show(view) {
  for (const section of document.querySelectorAll(".view")) section.classList.toggle("active", section.id === `view-${view}`);
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === view);
  if (view === "compare") renderComparePick();
  if (view === "chat") renderChatRuns();
}
window.addEventListener("hashchange", () => show(location.hash.slice(1) || "launch"));

// --- launch ------------------------------------------------------------------------------
async function buildForm() {
  const { data } = await api("/api/form");
  state.fields = data.fields;
  $("#runs-dir").textContent = `runs in ${data.runs_dir}`;
  const form = $("#launch-form");
  for (const field of data.fields) {
    let input;
    if (field.kind === "group" || field.kind === "choice") {
      input = el("select", { name: field.key, id: `field-${field.key}` });
      for (const choice of field.choices) input.append(el("option", { value: choice, text: choice || "(config's value)" }));
    } else if (field.kind === "lines") {
      input = el("textarea", { name: field.key, id: `field-${field.key}`, rows: "3", placeholder: "method.lr_scheduler.warmup_steps=10\ndata.val_fraction=0.1" });
    } else {
      input = el("input", { name: field.key, id: `field-${field.key}`, type: "text" });
    }
    if (data.defaults[field.key]) input.value = data.defaults[field.key];
    const wrapper = el("div", { class: `field ${field.kind}`, "data-field": field.key },
      el("label", { for: `field-${field.key}`, text: field.label }), input,
      el("div", { class: "help", text: field.help ? `${field.key === "name" ? "" : field.key + ": "}${field.help}` : field.key }),
      el("div", { class: "error", "data-for": field.key }));
    form.append(wrapper);
    if (field.kind === "group") input.addEventListener("change", loadDefaults);
  }
  $("#field-name").value = `run-${new Date().toISOString().slice(5, 19).replace(/[-:T]/g, "")}`;
  loadDefaults();
}

function formValues() {
  const values = {};
  for (const field of state.fields) values[field.key] = $(`#field-${CSS.escape(field.key)}`).value;
  return values;
}

async function loadDefaults() {
  const values = formValues();
  const query = new URLSearchParams({ method: values.method, modelpool: values.modelpool, data: values.data, taskpool: values.taskpool });
  const { data } = await api(`/api/defaults?${query}`);
  for (const [key, value] of Object.entries(data)) {
    const input = document.getElementById(`field-${key}`);
    if (!input) continue;
    if (input.tagName === "SELECT") input.options[0].textContent = value ? `(config's value: ${value})` : "(config's value)";
    else input.placeholder = value;
  }
}

function showErrors(errors) {
  for (const node of document.querySelectorAll("#view-launch .error")) node.textContent = "";
  for (const node of document.querySelectorAll(".field")) node.classList.remove("invalid");
  for (const [key, message] of Object.entries(errors || {})) {
    const node = document.querySelector(`#view-launch .error[data-for="${CSS.escape(key)}"]`) || document.querySelector('#view-launch .error[data-for="form"]');
    node.textContent = message;
    const field = document.querySelector(`.field[data-field="${CSS.escape(key)}"]`);
    if (field) field.classList.add("invalid");
  }
}

async function check(launch) {
  $("#launch-state").textContent = launch ? "checking and launching…" : "checking…";
  for (const button of document.querySelectorAll("#view-launch button")) button.disabled = true;
  try {
    const values = formValues();
    const { ok, data } = await api(launch ? "/api/runs" : "/api/validate", values);
    showErrors(data.errors);
    const failed = !ok || Object.keys(data.errors || {}).length > 0;
    $("#command").textContent = data.command || (data.overrides ? `tunelab train ${data.overrides.join(" ")}` : "");
    $("#launch-state").textContent = failed ? "not launched: fix the fields marked in red" : launch ? `launched ${data.name}` : "the form is valid";
    if (launch && !failed) {
      state.watched.add(data.name);
      state.focus = data.name;
      $("#field-name").value = `${values.name}-2`;
      location.hash = "#watch";
      await refreshRuns();
    }
  } finally {
    for (const button of document.querySelectorAll("#view-launch button")) button.disabled = false;
  }
}

// --- watch -------------------------------------------------------------------------------
async function refreshRuns() {
  const { data } = await api("/api/runs");
  state.runs = data;
  if (state.watched.size === 0 && data.length) state.watched.add(data[0].name);
  const body = $("#runs-table tbody");
  body.replaceChildren();
  for (const run of data) {
    const tick = el("input", { type: "checkbox", "data-run": run.name });
    tick.checked = state.watched.has(run.name);
    tick.addEventListener("change", () => { tick.checked ? state.watched.add(run.name) : state.watched.delete(run.name); drawWatch(); });
    const actions = el("td");
    if (run.status === "running") actions.append(button("Stop", "stop", run.name));
    if (run.can_resume) actions.append(button("Resume", "resume", run.name));
    const name = el("a", { href: "#watch", text: run.name });
    name.addEventListener("click", () => { state.focus = run.name; refreshLog(); });
    const progress = run.progress === null ? "–" : el("span", { class: "bar", title: `${Math.round(run.progress * 100)}%` }, el("span", { style: `width:${Math.round(run.progress * 100)}%` }));
    body.append(el("tr", { "data-run": run.name, "data-status": run.status },
      el("td", {}, tick), el("td", {}, name), el("td", {}, el("span", { class: `status ${run.status}`, text: run.status })),
      el("td", {}, progress), el("td", { class: "num step", text: `${run.step}${run.total_steps ? " / " + run.total_steps : ""}` }),
      el("td", { class: "num", text: `${fmt(run.measured_s_per_step, 2)} (${fmt(run.estimated_s_per_step, 2)})` }),
      el("td", { class: "num", text: `${fmt(run.measured_peak_gib, 2)} (${fmt(run.estimated_peak_gib, 2)})` }),
      el("td", { class: "num", text: seconds(run.eta_s) }), actions));
  }
  await Promise.all([...state.watched].map(async (name) => { state.metrics[name] = (await api(`/api/runs/${encodeURIComponent(name)}/metrics`)).data; }));
  drawWatch();
  refreshLog();
}

function button(label, action, name) {
  const node = el("button", { type: "button", class: action, "data-run": name, text: label });
  node.addEventListener("click", async () => {
    node.disabled = true;
    const { ok, data } = await api(`/api/runs/${encodeURIComponent(name)}/${action}`, {});
    if (!ok) alert(Object.values(data.errors || {}).join("\n"));
    await refreshRuns();
  });
  return node;
}

async function refreshLog() {
  const name = state.focus || [...state.watched][0];
  if (!name) return;
  const { data } = await api(`/api/runs/${encodeURIComponent(name)}`);
  $("#log-title").textContent = `Log of ${name}${data.error ? " — " + data.error : ""}`;
  const log = $("#run-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent = data.log || "";
  if (atEnd) log.scrollTop = log.scrollHeight;
}

function seriesFor(metric, names) {
  return names.map((name, i) => ({ name, color: COLORS[i % COLORS.length], points: (state.metrics[name] || {})[metric] || [] }));
}

function drawWatch() {
  const names = [...state.watched];
  for (const svg of document.querySelectorAll("#view-watch svg")) lineChart(svg, seriesFor(svg.dataset.metric, names));
}

// A line chart in SVG: one path per series, axes with the ranges, a legend.
function lineChart(svg, series) {
  const width = svg.clientWidth || 560, height = svg.clientHeight || 220, left = 54, right = 10, top = 10, bottom = 34;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const make = (tag, attrs, text) => { const n = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text !== undefined) n.textContent = text; svg.append(n); return n; };
  const all = series.flatMap((s) => s.points);
  if (!all.length) { make("text", { x: left, y: height / 2 }, "no points yet"); return; }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 1; y1 += Math.abs(y1) * 0.05 || 1; }
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const sy = (y) => top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom);
  make("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis" });
  make("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" });
  for (let i = 0; i <= 3; i++) {
    const y = y0 + ((y1 - y0) * i) / 3;
    make("text", { x: left - 4, y: sy(y) + 3, "text-anchor": "end" }, fmt(y, y1 - y0 < 0.1 ? 4 : 2));
    make("line", { x1: left, y1: sy(y), x2: width - right, y2: sy(y), class: "axis", "stroke-dasharray": "2,3" });
  }
  make("text", { x: left, y: height - bottom + 13, "text-anchor": "middle" }, fmt(x0));
  make("text", { x: width - right, y: height - bottom + 13, "text-anchor": "end" }, `step ${fmt(x1)}`);
  series.forEach((s, i) => {
    if (!s.points.length) return;
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
    make("path", { d, class: "series", stroke: s.color, "data-run": s.name, "data-points": s.points.length });
    if (s.points.length === 1) make("circle", { cx: sx(s.points[0][0]), cy: sy(s.points[0][1]), r: 3, fill: s.color });
    make("text", { x: left + 8 + i * 150, y: height - 6, fill: s.color, style: `fill:${s.color}` }, `■ ${s.name}`);
  });
}

// --- chat --------------------------------------------------------------------------------
function renderChatRuns() {
  const select = $("#chat-run");
  const current = select.value;
  select.replaceChildren(...state.runs.map((run) => el("option", { value: run.name, text: `${run.name} (${run.status})` })));
  if (current && state.runs.some((r) => r.name === current)) select.value = current;
}

async function sendChat() {
  const chatError = $('.error[data-for="chat"]');
  chatError.textContent = "";
  $("#chat-send").disabled = true;
  $("#chat-state").textContent = "asking both models (the first question starts their servers)…";
  $("#chat-base").textContent = $("#chat-tuned").textContent = "";
  try {
    const { ok, data } = await api("/api/chat", { run: $("#chat-run").value, prompt: $("#chat-prompt").value, max_tokens: Number($("#chat-max-tokens").value) });
    if (!ok) { chatError.textContent = Object.values(data.errors || {}).join("\n"); $("#chat-state").textContent = ""; return; }
    for (const side of ["base", "tuned"]) {
      const answer = data[side];
      const blank = !answer.error && answer.text.trim() === "";
      $(`#chat-${side}`).textContent = answer.error ? `error: ${answer.error}` : blank ? `(only white space: ${JSON.stringify(answer.text)})` : answer.text;
      $(`#chat-${side}-meta`).textContent = answer.error ? "" : `${answer.tokens} tokens, ${answer.seconds.toFixed(1)} s, ${answer.finish_reason}`;
    }
    $("#chat-state").textContent = `base: ${data.base_model}; trained: ${data.checkpoint}${data.base_note ? ". Note: " + data.base_note : ""}`;
  } finally {
    $("#chat-send").disabled = false;
  }
}

// --- compare -----------------------------------------------------------------------------
function renderComparePick() {
  const pick = $("#compare-pick");
  const ticked = new Set([...pick.querySelectorAll("input:checked")].map((n) => n.value));
  pick.replaceChildren(...state.runs.map((run) => {
    const tick = el("input", { type: "checkbox", value: run.name });
    tick.checked = ticked.has(run.name);
    return el("label", {}, tick, ` ${run.name}`);
  }));
}

async function compare() {
  const names = [...document.querySelectorAll("#compare-pick input:checked")].map((n) => n.value);
  const error = $('.error[data-for="compare"]');
  const { ok, data } = await api(`/api/compare?runs=${names.map(encodeURIComponent).join(",")}`);
  error.textContent = ok ? "" : Object.values(data.errors || {}).join("\n");
  if (!ok) return;
  state.compared = data;
  const columns = ["status", "steps", "train/loss", "val/loss", "val/perplexity", "train/tokens_per_s", "train_seconds"];
  $("#compare-finals").replaceChildren(el("tr", {}, el("th", { text: "run" }), ...columns.map((c) => el("th", { text: c }))),
    ...data.runs.map((name) => el("tr", { "data-run": name }, el("td", { text: name }), ...columns.map((c) => el("td", { class: "num", "data-key": c, text: fmt(data.finals[name][c], 4) })))));
  $("#compare-diff").replaceChildren(el("tr", {}, el("th", { text: "config key" }), ...data.runs.map((n) => el("th", { text: n }))),
    ...(data.differences.length ? data.differences.map((d) => el("tr", { "data-key": d.key }, el("td", { text: d.key }), ...data.runs.map((n) => el("td", { text: JSON.stringify(d.values[n]) })))) : [el("tr", {}, el("td", { text: "the configs are the same (but for output_dir)" }))]));
  await Promise.all(data.runs.map(async (name) => { state.metrics[name] = (await api(`/api/runs/${encodeURIComponent(name)}/metrics`)).data; }));
  const metrics = [...new Set(data.runs.flatMap((n) => Object.keys(state.metrics[n] || {})))].sort();
  const select = $("#compare-metric");
  const chosen = select.value || (metrics.includes("train/loss") ? "train/loss" : metrics[0]);
  select.replaceChildren(...metrics.map((m) => el("option", { value: m, text: m })));
  select.value = chosen;
  drawCompare();
  const registry = (await api("/api/registry")).data;
  $("#registry-note").textContent = registry.note || `registry ${registry.url}: ${registry.versions.length} version${registry.versions.length === 1 ? "" : "s"}`;
  $("#registry").replaceChildren(el("tr", {}, ...["version", "stage", "kind", "run", "created", "val/loss"].map((c) => el("th", { text: c }))),
    ...registry.versions.map((v) => el("tr", { "data-ref": `${v.name}@${v.version}` }, el("td", { text: `${v.name}@${v.version}` }), el("td", { text: v.stage }),
      el("td", { text: v.kind }), el("td", { text: v.run || v.path }), el("td", { text: v.created_at }), el("td", { class: "num", text: fmt((v.metrics || {})["val/loss"], 4) }))));
}

function drawCompare() {
  if (state.compared) lineChart($("#chart-compare"), seriesFor($("#compare-metric").value, state.compared.runs));
}

// --- start -------------------------------------------------------------------------------
$("#validate").addEventListener("click", () => check(false));
$("#launch").addEventListener("click", () => check(true));
$("#chat-send").addEventListener("click", sendChat);
$("#compare-go").addEventListener("click", compare);
$("#compare-metric").addEventListener("change", drawCompare);
buildForm().then(refreshRuns).then(() => show(location.hash.slice(1) || "launch"));
setInterval(() => { if (document.querySelector("#view-watch.active") || !state.runs.length) refreshRuns(); }, 2000);
