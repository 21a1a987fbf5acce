// kneurons explorer: the page over the JSON API of kneurons.server.app (no libraries, nothing from the network).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, set: null, heat: null, selected: new Set(), prompts: [], target: "" };

function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
const fmt = (x, d = 4) => (x === null || x === undefined ? "–" : Number(x).toPrecision(d));
const pct = (x) => (x === null || x === undefined ? "–" : (x >= 0 ? "+" : "") + (100 * x).toFixed(1) + " %");
const tok = (t) => JSON.stringify(t);
const key = (l, i) => l + ":" + i;

async function api(path, body) {
  const opts = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: typeof body === "string" ? body : JSON.stringify(body),
  };
  const res = await fetch(path, opts);
  let data;
  try { data = await res.json(); } catch (e) { data = { error: "HTTP " + res.status }; }
  if (!res.ok) throw new Error(data.error || "HTTP " + res.status);
  return data;
}

// run fn with the panel's error box cleared, its message shown inline on failure
async function guarded(errorId, button, fn) {
  $(errorId).textContent = "";
  if (button) button.disabled = true;
  try { await fn(); } catch (e) { $(errorId).textContent = e.message; }
  finally { if (button) button.disabled = false; }
}

function table(el, headers, rows) {
  el.innerHTML = "<tr>" + headers.map((h) => "<th>" + esc(h) + "</th>").join("") + "</tr>" +
    rows.map((r) => "<tr>" + r.join("") + "</tr>").join("");
}
const td = (x, cls) => "<td" + (cls ? ' class="' + cls + '"' : "") + ">" + x + "</td>";

// ------------------------------------------------------------------------------------------ model state
function showState(s) {
  const badge = $("model-state");
  if (s.edited) {
    const e = s.edit;
    badge.textContent = "EDITED: " + e.kind + " " + (e.old || "") + " → " + (e.new || "") + " (" + e.slots + " value slots)";
    badge.className = "badge edited";
  } else {
    badge.textContent = "original weights";
    badge.className = "badge original";
  }
  $("revert-btn").disabled = !s.edited;
  const c = s.last_check;
  $("digest-check").textContent = c
    ? "after revert: sha256 " + c.digest.slice(0, 12) + "… " + (c.identical ? "= original ✓ bit-identical" : "≠ original ✗")
    : "weights sha256 " + s.original_digest.slice(0, 12) + "…";
}

// ------------------------------------------------------------------------------------------ predict
function topTable(top, target) {
  const max = Math.max(...top.map((p) => p.prob), 1e-12);
  return "<table>" + top.map((p) =>
    "<tr><td class='tokens'>" + esc(tok(p.token)) + (p.token.trim() === target ? " ◀" : "") + "</td>" +
    td(fmt(p.prob), "n") + "<td><span class='bar' style='width:" + (120 * p.prob / max).toFixed(0) + "px'></span></td></tr>"
  ).join("") + "</table>";
}

async function predict() {
  const body = { prompt: $("predict-prompt").value, top_k: Number($("predict-topk").value) };
  if ($("predict-target").value !== "") body.target = $("predict-target").value;  // empty: the top-k only
  const r = await api("/api/predict", body);
  const edited = r.edited ? " — on the edited model" : "";
  $("predict-out").innerHTML = "<p id='predict-summary'>" + (r.target === null ? "top-" + r.top.length + edited
    : "P(" + esc(r.target) + ") = <b>" + fmt(r.prob) + "</b>, rank " + r.rank + (r.correct ? " (top-1)" : "") + edited) +
    "</p>" + topTable(r.top, r.target === null ? null : r.target);
}

// ------------------------------------------------------------------------------------------ locate
function b64floats(s) {
  const bin = atob(s);
  const bytes = new Uint8Array(bin.length);
  for (let k = 0; k < bin.length; k++) bytes[k] = bin.charCodeAt(k);
  return new Float32Array(bytes.buffer);
}

async function locate() {
  const prompts = $("locate-prompts").value.split("\n").map((s) => s.trim()).filter((s) => s);
  const th = $("locate-threshold").value.trim();
  const body = {
    prompts, target: $("locate-target").value, method: $("locate-method").value, score: $("locate-score").value,
    foils: $("locate-foils").value.split(",").map((s) => s.trim()).filter((s) => s),
    steps: Number($("locate-steps").value), threshold: th === "" ? null : Number(th), p: Number($("locate-p").value),
    min_prompts: Number($("locate-min").value), adaptive: $("locate-adaptive").checked,
  };
  let job = await api("/api/locate", body);
  $("locate-bar").value = 0;
  while (job.state === "queued" || job.state === "running") {
    showProgress(job);
    await new Promise((r) => setTimeout(r, 250));
    job = await api("/api/jobs/" + job.id);
  }
  showProgress(job);
  if (job.state === "error") throw new Error(job.error);
  state.prompts = prompts;
  state.target = body.target.trim();
  showSet(job.result);
}

function showProgress(job) {
  const frac = job.total ? job.done / job.total : (job.state === "done" ? 1 : 0);
  $("locate-bar").value = frac;
  const st = job.stage && job.state === "running"
    ? ", block " + job.stage.layer + (job.stage.direction === "forward" ? " forward" : " backward") : "";
  $("locate-progress").textContent = job.state + ": " + job.done + " / " + job.total + " rows, " +
    job.elapsed.toFixed(1) + " s" + st;
}

function showSet(res) {
  state.set = res.set;
  state.selected = new Set(res.set.neurons.map(([l, i]) => key(l, i)));
  if (res.set.prompts.length) state.prompts = res.set.prompts;
  if (res.set.target) state.target = res.set.target;
  $("save-btn").disabled = false;
  $("neurons-wrap").hidden = false;
  const p = res.set.params || {};
  $("neurons-caption").textContent = res.set.neurons.length + " neurons of '" + res.set.target + "' from " +
    res.set.prompts.length + " prompt(s), method " + res.set.method + (p.p_used ? ", p = " + p.p_used : "");
  const rows = res.table.map((r) => [
    "<td><input type='checkbox' data-key='" + key(r.layer, r.neuron) + "' checked></td>",
    td(r.layer, "n"), td(r.neuron, "n"), td(r.n_prompts_coarse ?? "–", "n"), td(fmt(r.mean_score), "n"),
    td(fmt(r.activation), "n"),
  ]);
  table($("neurons-table"), ["use", "layer", "neuron", "coarse in prompts", "mean score", "activation"], rows);
  $("neurons-table").querySelectorAll("input[type=checkbox]").forEach((cb) => cb.addEventListener("change", () => {
    if (cb.checked) state.selected.add(cb.dataset.key); else state.selected.delete(cb.dataset.key);
    showSelection();
  }));
  state.heat = null;
  if (res.heatmap) {
    const h = res.heatmap;
    state.heat = { ...h, scores: b64floats(h.scores), activations: b64floats(h.activations) };
  }
  drawHeatmap();
  showSelection();
}

function showSelection() {
  const list = [...state.selected].map((k) => k.split(":").map(Number)).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  $("selection").textContent = list.length ? list.map(([l, i]) => "L" + l + " #" + i).join(", ") : "none";
  $("neurons-table").querySelectorAll("input[type=checkbox]").forEach((cb) => { cb.checked = state.selected.has(cb.dataset.key); });
  drawHeatmap();
}

function selectedNeurons() {
  const list = [...state.selected].map((k) => k.split(":").map(Number));
  if (!list.length) throw new Error("select at least one neuron (locate, load a neuron set, or click the heatmap)");
  return list;
}

// ------------------------------------------------------------------------------------------ heatmap
function heatGeometry(h) {
  const cw = Math.max(1, Math.floor(1200 / h.d_ff));
  const rh = Math.max(6, Math.min(24, Math.floor(360 / h.n_layers)));
  return { cw, rh, left: 36 };
}

function drawHeatmap() {
  const wrap = $("heatmap-wrap");
  const h = state.heat;
  if (!h) { wrap.hidden = true; return; }
  wrap.hidden = false;
  const g = heatGeometry(h);
  const cv = $("heatmap");
  cv.width = g.left + h.d_ff * g.cw;
  cv.height = h.n_layers * g.rh;
  const ctx = cv.getContext("2d");
  const img = ctx.createImageData(h.d_ff * g.cw, h.n_layers * g.rh);
  const m = h.max_abs || 1;
  for (let l = 0; l < h.n_layers; l++) {
    for (let i = 0; i < h.d_ff; i++) {
      const v = h.scores[l * h.d_ff + i] / m;
      const a = Math.sqrt(Math.min(1, Math.abs(v)));
      const rgb = v >= 0 ? [255, Math.round(255 * (1 - a)), Math.round(255 * (1 - a))]
                         : [Math.round(255 * (1 - a)), Math.round(255 * (1 - a)), 255];
      for (let y = l * g.rh; y < (l + 1) * g.rh; y++) {
        for (let x = i * g.cw; x < (i + 1) * g.cw; x++) {
          const o = 4 * (y * h.d_ff * g.cw + x);
          img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
        }
      }
    }
  }
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, g.left, cv.height);
  ctx.putImageData(img, g.left, 0);
  ctx.fillStyle = "#444";
  ctx.font = "10px sans-serif";
  const every = Math.ceil(12 / g.rh);
  for (let l = 0; l < h.n_layers; l += every) ctx.fillText("L" + l, 2, l * g.rh + Math.min(g.rh, 10));
  ctx.strokeStyle = "#000";
  ctx.lineWidth = 1.5;
  for (const k of state.selected) {
    const [l, i] = k.split(":").map(Number);
    if (l < h.n_layers && i < h.d_ff) ctx.strokeRect(g.left + i * g.cw - 2.5, l * g.rh - 0.5, g.cw + 5, g.rh + 1);
  }
  $("heatmap-caption").textContent = "attribution (" + h.method + ", " + (h.score || "") + ", mean over " + h.prompts +
    " prompt(s)) over " + h.n_layers + " layers × " + h.d_ff + " neurons; red positive, blue negative, max |score| " +
    fmt(h.max_abs, 3) + ". Hover for values, click to select or unselect a neuron; boxes: selected.";
}

function cellAt(ev) {
  const h = state.heat;
  if (!h) return null;
  const g = heatGeometry(h);
  const r = $("heatmap").getBoundingClientRect();
  const x = ev.clientX - r.left - g.left, y = ev.clientY - r.top;
  const i = Math.floor(x / g.cw), l = Math.floor(y / g.rh);
  if (i < 0 || l < 0 || i >= h.d_ff || l >= h.n_layers) return null;
  return { l, i, score: h.scores[l * h.d_ff + i], act: h.activations[l * h.d_ff + i] };
}

// ------------------------------------------------------------------------------------------ explain
async function explain() {
  const body = { neurons: selectedNeurons(), top_k: 8, top_facts: 3 };
  if (state.prompts.length && state.target) { body.prompt = state.prompts[0]; body.target = state.target; }
  const r = await api("/api/explain", body);
  table($("explain-table"), ["layer", "neuron", "activation", "promotes", "demotes", "most active on (built-in facts)"],
    r.rows.map((x) => [td(x.layer, "n"), td(x.neuron, "n"), td(fmt(x.activation), "n"),
      td(x.promotes.map((t) => esc(tok(t))).join(" "), "tokens up"), td(x.demotes.map((t) => esc(tok(t))).join(" "), "tokens down"),
      td((x.top_facts || []).map((f, j) => esc(f) + " (" + fmt(x.top_fact_activations[j], 3) + ")").join("<br>") || "–")]));
}

// ------------------------------------------------------------------------------------------ interventions
function controls() {
  return $("controls").value.split("\n").map((s) => s.trim()).filter((s) => s).map((line) => {
    const parts = line.split("|").map((s) => s.trim());
    if (parts.length !== 3) throw new Error("control line must be 'group | prompt | target': " + line);
    return { group: parts[0], prompt: parts[1], target: parts[2] };
  });
}

function factPrompts() {
  if (!state.prompts.length || !state.target) throw new Error("locate a fact or load a neuron set first (its prompts and target are used)");
  return state.prompts;
}

async function intervene(factor) {
  const r = await api("/api/intervene", {
    neurons: selectedNeurons(), factor, prompts: factPrompts(), target: state.target, controls: controls(),
  });
  const s = r.summary;
  const rows = r.rows.map((x) => [td(esc(x.group)), td(esc(x.prompt)), td(esc(x.target)), td(fmt(x.before), "n"),
    td(fmt(x.after), "n"), td(pct(x.rel_change), "n " + (x.rel_change < 0 ? "down" : "up"))]);
  $("intervene-out").innerHTML =
    "<p id='intervene-summary'>×" + r.factor + " on " + r.neurons.length + " neurons: Δp/p fact <b>" + pct(s.fact) +
    "</b>, same relation " + pct(s.same_relation) + ", other relations " + pct(s.other_relation) +
    ", specificity " + fmt(s.specificity, 3) + "</p><table id='intervene-rows'></table>" +
    "<div class='row'><div><h3>top-k before</h3>" + topTable(r.before.top, r.before.target) + "</div><div><h3>top-k after</h3>" +
    topTable(r.after.top, r.after.target) + "</div></div>";
  table($("intervene-rows"), ["group", "prompt", "target", "p before", "p after", "Δp/p"], rows);
}

// ------------------------------------------------------------------------------------------ edit and revert
async function update() {
  const body = {
    neurons: selectedNeurons(), prompts: factPrompts(), target: state.target, new: $("update-new").value,
    controls: controls(), space: $("update-space").value,
    lambda1: Number($("update-l1").value), lambda2: Number($("update-l2").value),
  };
  const m = $("update-method");
  if (m && m.value) body.method = m.value;
  const r = await api("/api/update", body);
  showState(r);
  const b = r.before, a = r.after;
  const rows = b.prompts.map((x, k) => [td(esc(x.prompt)), td(fmt(x.p_old), "n"), td(fmt(a.prompts[k].p_old), "n"),
    td(fmt(x.p_new), "n"), td(fmt(a.prompts[k].p_new), "n"), td(x.rank_new + " → " + a.prompts[k].rank_new, "n"),
    td(esc(tok(a.prompts[k].top[0].token)), "tokens")]);
  const crow = b.controls.map((x, k) => [td(esc(x.group)), td(esc(x.prompt)), td(esc(x.target)), td(fmt(x.prob), "n"),
    td(fmt(a.controls[k].prob), "n")]);
  $("update-out").innerHTML = "<p id='update-summary'>" + esc(state.target) + " → " + esc(body.new) +
    ": success@1 " + (100 * a.success1).toFixed(0) + " %, success@5 " + (100 * a.success5).toFixed(0) +
    " %</p><table id='update-rows'></table><table id='update-controls'></table>";
  table($("update-rows"), ["prompt", "P(old) before", "after", "P(new) before", "after", "rank of new", "top-1 after"], rows);
  if (crow.length) table($("update-controls"), ["group", "control prompt", "target", "p before", "p after"], crow);
}

async function revert() {
  const s = await api("/api/revert", {});
  showState(s);
  $("update-out").innerHTML += "<p id='revert-summary'>reverted: weights " +
    (s.last_check.identical ? "bit-identical to the original (sha256 " + s.last_check.digest.slice(0, 16) + "…)" : "DIFFER") + "</p>";
}

// ------------------------------------------------------------------------------------------ save / load
function download() {
  const blob = new Blob([JSON.stringify(state.set, null, 1)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = (state.set.target || "neurons").replace(/[^\w.-]+/g, "_") + ".json";
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

async function upload(file) {
  const text = await file.text();
  showSet(await api("/api/neurons/load", text));
}

// ------------------------------------------------------------------------------------------ runs
async function runs() {
  const r = await api("/api/runs");
  $("runs-panel").hidden = false;
  table($("runs-table"), ["run (in " + (r.runs_dir || "") + ")", "model", "report"], r.runs.map((x) => [
    td(esc(x.name)), td(esc(x.model || "–")),
    td(x.report ? "<a target='_blank' href='" + esc(x.report) + "'>open report</a>" : "no report yet (kneurons report)")]));
}

// ------------------------------------------------------------------------------------------ start
function fillSelect(el, items, chosen) {
  el.innerHTML = items.map((x) => "<option value='" + esc(x.name) + "'" + (x.name === chosen ? " selected" : "") +
    (x.description ? " title='" + esc(x.description) + "'" : "") + ">" + esc(x.name) + "</option>").join("");
}

async function start() {
  const info = await api("/api/info");
  state.info = info;
  const m = info.model;
  $("model-name").textContent = m.name + " (" + m.type + ", " + m.kind + ", " + m.n_layers + " layers × " + m.d_ff +
    " FFN neurons, " + m.dtype + ", " + m.device + ") · kneurons " + info.version;
  fillSelect($("locate-method"), info.methods, "integrated_gradients");
  fillSelect($("locate-score"), info.scores, "prob");
  $("locate-steps").max = info.limits.steps;
  let fields = "<label>space <select id='update-space'>" + info.spaces.map((s) => "<option>" + esc(s) + "</option>").join("") + "</select></label>";
  if (info.update_methods.length) {
    fields += " <label>method <select id='update-method'>" + info.update_methods.map((s) => "<option>" + esc(s) + "</option>").join("") + "</select></label>";
  }
  fields += " <label>λ1 <input id='update-l1' class='num' value='1'></label> <label>λ2 <input id='update-l2' class='num' value='8'></label>";
  $("update-fields").innerHTML = fields;
  const ex = info.example;
  if (ex && ex.prompts.length) {
    $("predict-prompt").value = ex.prompts[0];
    $("predict-target").value = ex.target;
    $("locate-prompts").value = ex.prompts.slice(0, 3).join("\n");
    $("locate-target").value = ex.target;
    $("controls").value = ex.controls.map((c) => c.group + " | " + c.prompt + " | " + c.target).join("\n");
  }
  showState(await api("/api/state"));
  if (info.runs) await guarded("runs-error", null, runs);
}

$("predict-btn").addEventListener("click", () => guarded("predict-error", $("predict-btn"), predict));
$("locate-btn").addEventListener("click", () => guarded("locate-error", $("locate-btn"), locate));
$("explain-btn").addEventListener("click", () => guarded("explain-error", $("explain-btn"), explain));
$("suppress-btn").addEventListener("click", () => guarded("intervene-error", $("suppress-btn"), () => intervene(0)));
$("amplify-btn").addEventListener("click", () => guarded("intervene-error", $("amplify-btn"),
  () => intervene(Number($("factor-value").value))));
$("update-btn").addEventListener("click", () => guarded("update-error", $("update-btn"), update));
$("revert-btn").addEventListener("click", () => guarded("update-error", $("revert-btn"), revert));
$("factor").addEventListener("input", () => { $("factor-value").value = $("factor").value; });
$("clear-btn").addEventListener("click", () => { state.selected.clear(); showSelection(); });
$("save-btn").addEventListener("click", download);
$("load-file").addEventListener("change", (ev) => {
  const f = ev.target.files[0];
  if (f) guarded("locate-error", null, () => upload(f)).then(() => { ev.target.value = ""; });
});
$("heatmap").addEventListener("mousemove", (ev) => {
  const c = cellAt(ev), tip = $("tooltip");
  if (!c) { tip.hidden = true; return; }
  tip.hidden = false;
  tip.textContent = "layer " + c.l + ", neuron " + c.i + "\nscore " + fmt(c.score) + "\nactivation " + fmt(c.act);
  tip.style.left = ev.clientX + 14 + "px";
  tip.style.top = ev.clientY + 14 + "px";
});
$("heatmap").addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
$("heatmap").addEventListener("click", (ev) => {
  const c = cellAt(ev);
  if (!c) return;
  const k = key(c.l, c.i);
  if (state.selected.has(k)) state.selected.delete(k); else state.selected.add(k);
  showSelection();
});
guarded("predict-error", null, start);
