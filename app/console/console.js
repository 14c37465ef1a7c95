// clipshot console: plain JavaScript over the public HTTP API (no framework, no CDN: works offline).
// The key stays in this tab's sessionStorage and goes out as `Authorization: Bearer` on every API call.
"use strict";

const $ = (id) => document.getElementById(id);
const API = new URL(".", document.baseURI).pathname.replace(/\/$/, "") + "/v1";  // honours a proxy prefix
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const state = { key: sessionStorage.getItem("clipshot-key") || "", selected: null, products: [] };

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(method, path, body) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  if (body && !(body instanceof FormData)) { headers["Content-Type"] = "application/json"; body = JSON.stringify(body); }
  const response = await fetch(API + path, { method, headers, body });
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code || "http_" + response.status,
                       error.message || `${method} ${path}: HTTP ${response.status}`);
  }
  return data;
}

// A picture behind the key (an <img> cannot send the Authorization header): fetched as a Blob.
async function apiBlob(path) {
  const response = await fetch(API + path, { headers: state.key ? { Authorization: `Bearer ${state.key}` } : {} });
  if (!response.ok) throw new ApiError(response.status, "http_" + response.status, `GET ${path}: HTTP ${response.status}`);
  return response.blob();
}

function say(text, isError = false) {
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
}

function fail(error, what) {
  // The decision routes (threshold, feedback, shots) may be missing on an older server: say so plainly.
  if (error.status === 404 && error.code === "not_found" || error.status === 405) {
    say(`${what}: this server does not offer that yet (HTTP ${error.status}).`, true);
  } else {
    say(`${what}: ${error.message}`, true);
  }
}

const pct = (x) => (x === null || x === undefined ? "—" : `${(100 * x).toFixed(1)} %`);
const num = (x, digits = 4) => (x === null || x === undefined ? "—" : Number(x).toFixed(digits));
const enc = encodeURIComponent;

// The decision object (threshold + expected rates) when the server has one; else the active version's threshold.
function decisionOf(product) {
  if (product.decision) return product.decision;
  const active = (product.versions || []).find((v) => v.active);
  const threshold = active && active.metrics ? active.metrics.threshold : undefined;
  return threshold === undefined ? {} : { threshold };
}

// --- products ------------------------------------------------------------------------------------

async function loadProducts() {
  const list = await api("GET", "/categories");
  const details = await Promise.all(list.categories.map((c) => api("GET", `/categories/${enc(c.category)}`)
    .catch(() => ({ category: c.category, active_version: c.active_version, shots: c.shots }))));
  state.products = details;
  const body = $("product-list");
  body.replaceChildren();
  for (const p of details) {
    const d = decisionOf(p);
    const row = document.createElement("tr");
    row.dataset.category = p.category;
    for (const cell of [p.category, p.active_version ?? "—", p.shots, num(d.threshold),
                        pct(d.expected_false_alarm_rate), pct(d.expected_recall)]) {
      const td = document.createElement("td");
      td.textContent = cell;
      row.append(td);
    }
    row.classList.toggle("selected", p.category === state.selected);
    row.addEventListener("click", () => select(p.category));
    body.append(row);
  }
  if (!details.length) body.innerHTML = '<tr><td colspan="6" class="muted">no products yet: register one</td></tr>';
  const pick = $("try-category");
  const current = pick.value;
  pick.replaceChildren(...details.map((p) => new Option(p.category, p.category)));
  if (details.some((p) => p.category === (state.selected || current))) pick.value = state.selected || current;
  if (state.selected) showDetail(details.find((p) => p.category === state.selected));
  refreshCards().catch((e) => fail(e, "Re-score"));
  document.dispatchEvent(new Event("clipshot:products"));  // other views (history) follow the product list
}

function select(category) {
  state.selected = category;
  $("try-category").value = category;
  for (const row of $("product-list").rows) row.classList.toggle("selected", row.dataset.category === category);
  const product = state.products.find((p) => p.category === category);
  showDetail(product);
  if (product && product.active_job) followJob(product.active_job.id).catch((e) => fail(e, "Fine-tune"));
}

function showDetail(product) {
  if (!product) { $("product-detail").hidden = true; return; }
  $("product-detail").hidden = false;
  $("detail-name").textContent = product.category;
  const d = product.decision;
  const facts = d ? [["threshold", num(d.threshold)], ["policy", d.policy],
    ["target false alarms", pct(d.target_false_alarm_rate)], ["expected false alarms", pct(d.expected_false_alarm_rate)],
    ["expected recall", pct(d.expected_recall)], ["confident", d.confident ? "yes" : "no"]]
    : [["threshold", num(decisionOf(product).threshold)],
       ["expected rates", "not reported by this server (it has no decision routes)"]];
  $("decision").replaceChildren(...facts.flatMap(([k, v]) => {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = v; dd.dataset.field = k;
    return [dt, dd];
  }));
  $("decision-note").textContent = (d && d.note) || "";
  $("versions").replaceChildren(...(product.versions || []).map((v) => {
    const li = document.createElement("li");
    li.textContent = `v${v.version} ${v.kind || ""} ${v.shots ?? "?"} shots${v.active ? " (active)" : ""}`;
    return li;
  }));
  $("shots").replaceChildren();
}

async function loadShots() {
  const category = state.selected;
  const data = await api("GET", `/categories/${enc(category)}/shots`);
  $("shots").replaceChildren(...data.shots.map((shot) => {
    const li = document.createElement("li");
    li.textContent = `${shot.file_name || shot.sha256.slice(0, 12)} · ${shot.label} · ${shot.source} `;
    const drop = document.createElement("button");
    drop.type = "button"; drop.className = "small"; drop.textContent = "remove";
    drop.addEventListener("click", () => refitJob("DELETE", `/categories/${enc(category)}/shots/${shot.sha256}`, null,
                                                  `Removing a shot of ${category}`)
      .then((r) => { say(`Removed a shot: ${category} is now version ${r.version}.`); return loadProducts(); })
      .then(loadShots).catch((e) => fail(e, "Remove shot")));
    li.append(drop);
    return li;
  }));
}

async function setThreshold(event) {
  event.preventDefault();
  const field = $("thr-mode").value;
  const raw = $("thr-value").value.trim();
  if (field !== "policy" && raw === "") { say("Enter a value for the new decision.", true); return; }
  const body = field === "policy" ? { policy: "auto" } : { [field]: Number(raw) };
  const route = `/categories/${enc(state.selected)}/threshold`;
  // The server decides what is extreme: preview the rule, and ask before applying one it warns about.
  const preview = await api("PUT", `${route}?dry_run=true`, body);
  const warnings = preview.warnings || [];
  if (warnings.length && !window.confirm(`Apply threshold ${num(preview.decision.threshold)}?\n\n`
      + `${warnings.join("\n")}`)) {
    say(`Threshold not changed: ${warnings.join("; ")}.`, true);
    return;
  }
  const r = await api("PUT", route, body);
  say(`${r.category} version ${r.version}: threshold ${num(r.decision.threshold)}.`);
  await loadProducts();
}

// --- registration and jobs --------------------------------------------------------------------------

async function register(event) {
  event.preventDefault();
  const category = $("reg-category").value.trim();
  const files = [...$("reg-files").files];
  if (!files.length) { say("Choose or drop at least one photo of a good part.", true); return; }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  if ($("reg-description").value.trim()) form.append("description", $("reg-description").value.trim());
  form.append("finetune", $("reg-finetune").checked ? "true" : "false");
  $("reg-submit").disabled = true;
  try {
    const r = await refitJob("POST", `/categories/${enc(category)}/shots`, form, `Registering ${category}`);
    $("reg-result").textContent = `${r.category}: version ${r.version} serves now (${r.shots} shots, ${r.added} new).`
      + (r.warnings.length ? " " + r.warnings.join(" ") : "");
    say(`Registered ${r.category}.`);
    state.selected = r.category;
    await loadProducts();
    if (r.job_id) await followJob(r.job_id);
  } finally {
    $("reg-submit").disabled = false;
  }
}

async function followJob(jobId) {
  if (state.following === jobId) return null;  // already polling it
  state.following = jobId;
  $("job").hidden = false;
  $("job-label").textContent = `Fine-tune ${jobId.slice(0, 8)}`;
  try {
    return await pollJob(jobId);
  } finally {
    state.following = null;
  }
}

async function pollJob(jobId) {
  for (;;) {
    const job = await api("GET", `/jobs/${enc(jobId)}`);
    $("job-progress").value = job.progress;
    $("job-state").textContent = `${job.state}${job.step !== null ? ` · step ${job.step}/${job.total_steps}` : ""}`
      + (job.error ? ` · ${job.error}` : job.message ? ` · ${job.message}` : "");
    if (TERMINAL.has(job.state)) { await loadProducts(); return job; }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

// --- trying images and feedback -----------------------------------------------------------------------

async function tryImages(files) {
  const category = $("try-category").value;
  if (!category) { say("Register or select a product first.", true); return; }
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  const r = await api("POST", `/categories/${enc(category)}/predict?heatmap=jpeg`, form);
  const results = $("results");
  r.predictions.forEach((p, i) => results.prepend(resultCard(category, p, files[i])));
  say(`Scored ${r.predictions.length} image(s) with ${category} version ${r.adapter_version}.`);
}

// Cards scored by a version that no longer serves (threshold change, feedback, rollback) are scored again, so
// a card never shows a verdict the line would not give now. One request per product; the card keeps its place.
async function refreshCards() {
  const byCategory = new Map();
  for (const card of $("results").querySelectorAll(".result")) {
    const product = state.products.find((p) => p.category === card.dataset.category);
    const serving = product ? product.active_version : null;
    if (serving == null || Number(card.dataset.version) === serving || card.dataset.rescoring) continue;
    card.dataset.rescoring = String(serving);
    if (!byCategory.has(product.category)) byCategory.set(product.category, []);
    byCategory.get(product.category).push(card);
  }
  for (const [category, cards] of byCategory) {
    const form = new FormData();
    for (const card of cards) form.append("files", cardFiles.get(card), cardFiles.get(card).name);
    try {
      const r = await api("POST", `/categories/${enc(category)}/predict?heatmap=jpeg`, form);
      r.predictions.forEach((p, i) => fillCard(cards[i], p, cardFiles.get(cards[i])));
    } finally {
      for (const card of cards) delete card.dataset.rescoring;
    }
  }
}

const cardFiles = new WeakMap();  // card -> the File it shows, to score it again or send it as feedback

function resultCard(category, p, file) {
  const card = $("result-template").content.firstElementChild.cloneNode(true);
  card.dataset.category = category;
  cardFiles.set(card, file);
  fillCard(card, p, file);
  const out = card.querySelector(".feedback-result");
  const send = (label) => feedback(category, file, label)
    .then((r) => { out.textContent = feedbackText(r); card.dataset.feedback = label; })
    .catch((e) => fail(e, "Feedback"));
  card.querySelector(".mark-good").addEventListener("click", () => send("good"));
  card.querySelector(".mark-defect").addEventListener("click", () => send("defect"));
  return card;
}

function fillCard(card, p, file) {
  const h = p.heatmap;
  card.querySelector(".overlay").src = h && h.encoding !== "raw"
    ? `data:image/${h.encoding};base64,${h.data}` : URL.createObjectURL(file);
  const verdict = card.querySelector(".verdict");
  const label = p.is_anomalous === null ? "uncalibrated" : p.is_anomalous ? "anomalous" : "normal";
  verdict.textContent = label.toUpperCase();
  verdict.className = `verdict ${label}`;
  card.dataset.verdict = label;
  card.dataset.version = p.adapter_version ?? "";
  card.querySelector(".file").textContent = p.filename || "";
  card.querySelector(".score").textContent = num(p.score);
  card.querySelector(".threshold").textContent = num(p.threshold);
  card.querySelector(".version").textContent = p.adapter_version ?? "—";
  card.querySelector(".normalized").textContent = p.score_normalized == null ? ""
    : `= ${num(p.score_normalized, 2)} × threshold`;
  card.querySelector(".warnings").textContent = (p.warnings || []).join("; ");
  // Name the correction for what the operator saw: a flagged good part is a false alarm, a passed bad part a miss.
  card.querySelector(".mark-good").textContent = label === "anomalous" ? "False alarm" : "Good part";
  card.querySelector(".mark-defect").textContent = label === "normal" ? "Missed defect" : "Defect";
}

async function feedback(category, file, label) {
  const form = new FormData();
  form.append("files", file, file.name);
  form.append("label", label);
  const r = await refitJob("POST", `/categories/${enc(category)}/feedback`, form, `Feedback for ${category}`);
  await loadProducts();
  return r;
}

function feedbackText(r) {
  const v = r.validation || {};
  return `saved as version ${r.version}; threshold ${num(r.decision.threshold)}, `
    + `recall ${pct(v.recall)} on ${v.defects ?? 0} defects, false alarms ${pct(v.false_alarm_rate)}`;
}

// --- wiring ----------------------------------------------------------------------------------------

function dropZone(zone, input, onFiles) {
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    input.files = e.dataTransfer.files;
    input.dispatchEvent(new Event("change"));
  });
  input.addEventListener("change", () => onFiles([...input.files]));
}

// The backbone's abilities from /readyz (public): a backbone without a text tower cannot fine-tune, so the box
// is unticked and disabled instead of promising a job the server will skip.
async function loadAbilities() {
  const response = await fetch(API.replace(/\/v1$/, "") + "/readyz");
  const ready = await response.json().catch(() => ({}));
  const box = $("reg-finetune");
  const can = ready.finetune !== false;
  box.disabled = !can;
  if (!can) box.checked = false;
  box.dataset.checkedBy = "readyz";
  box.parentElement.title = can ? "" : `${ready.backbone || "this backbone"} cannot be fine-tuned (no text tower): `
    + "the memory adapter serves the product";
}

async function connect(event) {
  if (event) event.preventDefault();
  state.key = $("key").value.trim();
  sessionStorage.setItem("clipshot-key", state.key);
  loadAbilities().catch(() => {});  // an older server without the field keeps the box as it is
  try {
    await loadProducts();
    $("status").textContent = "connected";
    $("status").className = "";
    say("");
  } catch (e) {
    $("status").textContent = "not connected";
    fail(e, "Connect");
  }
}

function guard(what, fn) {
  return (...args) => Promise.resolve(fn(...args)).catch((e) => fail(e, what));
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = state.key;
  $("key-form").addEventListener("submit", connect);
  $("refresh").addEventListener("click", guard("Refresh", loadProducts));
  $("register-form").addEventListener("submit", guard("Register", register));
  $("threshold-form").addEventListener("submit", guard("Threshold", setThreshold));
  $("load-shots").addEventListener("click", guard("Shots", loadShots));
  dropZone($("reg-drop"), $("reg-files"), (files) => { $("reg-count").textContent = `${files.length} photo(s)`; });
  dropZone($("try-drop"), $("try-files"), guard("Predict", (files) => {
    $("try-files").value = "";  // the same photo chosen again must score again
    return files.length && tryImages(files);
  }));
  connect();  // with no key this still works on an insecure dev server, and says "send a key" otherwise
});
