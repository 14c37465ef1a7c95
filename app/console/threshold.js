// clipshot console, Threshold: the score distributions a product's decision rests on (GET .../scores) as one
// histogram, with the threshold as a line the operator drags. While dragging it shows, from those scores, the share
// of good evidence above the line (false alarms), of defect evidence above it (recall) and of recorded inspections
// it would flag; Preview asks the server (dry run: its bounds and warnings), Apply asks before a rule that warns.
// Uses console.js's api/state/say/fail/num/pct/enc/guard/loadProducts. Plain SVG: no library, works offline.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const CHART = { width: 800, height: 260, left: 48, right: 24, top: 12, bottom: 32, bins: 40 };
// [field of the scores answer, legend, colour]: one colour per kind of evidence.
const SERIES = [
  ["normal", "good shots (leave-one-out)", "#1b7f3a"],
  ["confirmed_goods", "confirmed goods", "#7b1fa2"],
  ["synthetic_defects", "synthetic defects", "#e08a00"],
  ["confirmed_defects", "confirmed defects", "#b3261e"],
  ["recorded", "recorded inspections", "#3367d6"],
];
const thv = { data: null, threshold: null, lo: 0, hi: 1, category: null };

const above = (scores, t) => (scores.length ? scores.filter((s) => s > t).length / scores.length : null);
const goodEvidence = (d) => d.normal.concat(d.confirmed_goods);
// The defect scores the expected recall counts: confirmed ones when there are any (as the server does).
const defectEvidence = (d) => (d.confirmed_defects.length ? d.confirmed_defects : d.synthetic_defects);

function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

const xOf = (score) => CHART.left + (score - thv.lo) / (thv.hi - thv.lo) * (CHART.width - CHART.left - CHART.right);
const scoreOf = (x) => thv.lo + (x - CHART.left) / (CHART.width - CHART.left - CHART.right) * (thv.hi - thv.lo);

async function loadScores() {
  const category = $("thv-category").value;
  if (!category) return;
  try {
    thv.data = await api("GET", `/categories/${enc(category)}/scores`);
  } catch (e) {
    thv.data = null;
    $("thv-chart").replaceChildren();
    $("thv-note").textContent = e.status === 409 ? `${category}: ${e.message}` : "";
    if (e.status !== 409) throw e;
    return;
  }
  thv.category = category;
  thv.threshold = thv.data.decision.threshold;
  const all = SERIES.flatMap(([field]) => thv.data[field]).concat([thv.threshold]);
  const lo = Math.min(...all), hi = Math.max(...all), pad = (hi - lo) * 0.05 || Math.abs(hi) * 0.05 || 0.05;
  thv.lo = lo - pad;
  thv.hi = hi + pad;
  drawChart();
  showLive();
  $("thv-server").replaceChildren();
  const d = thv.data;
  $("thv-note").textContent = `${category} version ${d.version}: ${d.good_images} good image(s); recall counts `
    + `${d.defect_evidence || "no"} defects; ${d.recorded.length} recorded inspection(s) of version(s) `
    + `${d.recorded_versions.join(", ")}. Drag the line (or use the arrow keys on the chart).`;
}

function drawChart() {
  const chart = $("thv-chart");
  const d = thv.data;
  const width = (thv.hi - thv.lo) / CHART.bins;
  const shares = SERIES.map(([field]) => {
    const counts = new Array(CHART.bins).fill(0);
    for (const s of d[field]) counts[Math.min(CHART.bins - 1, Math.floor((s - thv.lo) / width))] += 1;
    return counts.map((c) => (d[field].length ? c / d[field].length : 0));
  });
  const top = Math.max(...shares.flat(), 0.01);
  const base = CHART.height - CHART.bottom;
  const yOf = (share) => base - share / top * (base - CHART.top);
  const nodes = [svg("line", { x1: CHART.left, x2: CHART.width - CHART.right, y1: base, y2: base, stroke: "#999" })];
  for (let k = 0; k <= 4; k++) {  // five ticks along the score axis
    const score = thv.lo + k * (thv.hi - thv.lo) / 4;
    const label = svg("text", { x: xOf(score), y: base + 18, "text-anchor": "middle", "font-size": 11 });
    label.textContent = num(score, 3);
    nodes.push(label);
  }
  const axis = svg("text", { x: 4, y: CHART.top + 10, "font-size": 11, fill: "#666" });
  axis.textContent = "share";
  nodes.push(axis);
  SERIES.forEach(([field, , colour], i) => {
    if (!d[field].length) return;
    let path = `M ${xOf(thv.lo)} ${base}`;
    shares[i].forEach((share, b) => {
      const x0 = xOf(thv.lo + b * width), x1 = xOf(thv.lo + (b + 1) * width);
      path += ` L ${x0} ${yOf(share)} L ${x1} ${yOf(share)}`;
    });
    path += ` L ${xOf(thv.hi)} ${base} Z`;
    nodes.push(svg("path", { d: path, fill: colour, "fill-opacity": 0.25, stroke: colour, "data-series": field }));
  });
  const now = svg("line", { id: "thv-now", y1: CHART.top, y2: base, stroke: "#999", "stroke-dasharray": "4 3" });
  const line = svg("line", { id: "thv-line", y1: CHART.top, y2: base, stroke: "#222", "stroke-width": 2 });
  const handle = svg("rect", { id: "thv-handle", y: CHART.top, width: 14, height: base - CHART.top,
                               fill: "#222", "fill-opacity": 0.08, cursor: "ew-resize" });
  nodes.push(now, line, handle);
  chart.replaceChildren(...nodes);
  now.setAttribute("x1", xOf(d.decision.threshold));
  now.setAttribute("x2", xOf(d.decision.threshold));
  $("thv-legend").replaceChildren(...SERIES.map(([field, label, colour]) => {
    const item = document.createElement("span");
    item.className = "thv-key";
    item.style.setProperty("--key", colour);
    item.textContent = `${label} (${d[field].length})`;
    return item;
  }));
  placeLine();
}

function placeLine() {
  const x = xOf(thv.threshold);
  for (const attr of ["x1", "x2"]) $("thv-line").setAttribute(attr, x);
  $("thv-handle").setAttribute("x", x - 7);
}

function showLive() {
  const d = thv.data, t = thv.threshold;
  const flaggedNow = above(d.recorded, d.decision.threshold);
  const facts = [
    ["candidate threshold", t, `${num(t)} (${num(t / d.decision.threshold, 2)} × now ${num(d.decision.threshold)})`],
    ["good evidence above (false alarms)", above(goodEvidence(d), t), null],
    ["defect evidence above (recall)", above(defectEvidence(d), t), null],
    ["recorded inspections flagged", above(d.recorded, t), null],
  ];
  $("thv-live").replaceChildren(...facts.flatMap(([label, value, text]) => {
    const dt = document.createElement("dt"); dt.textContent = label;
    const dd = document.createElement("dd");
    dd.dataset.value = value === null ? "" : String(value);
    dd.textContent = text || pct(value);
    if (label.startsWith("recorded") && value !== null) dd.textContent += ` (now ${pct(flaggedNow)})`;
    return [dt, dd];
  }));
  $("thv-live").dataset.threshold = String(t);
}

function moveTo(clientX) {
  const chart = $("thv-chart");
  const point = new DOMPoint(clientX, 0).matrixTransform(chart.getScreenCTM().inverse());
  const x = Math.max(CHART.left, Math.min(CHART.width - CHART.right, point.x));
  thv.threshold = Math.max(0, scoreOf(x));  // a threshold is >= 0 (the API refuses a negative one)
  placeLine();
  showLive();
}

async function previewThreshold() {
  if (!thv.data) return null;
  const r = await api("PUT", `/categories/${enc(thv.category)}/threshold?dry_run=true`,
                      { threshold: thv.threshold });
  const rec = r.recorded;
  const lines = [`Server, at ${num(r.decision.threshold)}: false alarms at most `
    + `${pct(r.decision.expected_false_alarm_rate)} (90 % bound), expected recall ${pct(r.decision.expected_recall)}`];
  if (rec) lines.push(`recorded: ${rec.flagged} of ${rec.inspections} flagged (${pct(rec.share)}), now `
    + `${rec.flagged_now ?? "—"} (${pct(rec.share_now)})`);
  const out = $("thv-server");
  out.replaceChildren(...lines.map((text) => Object.assign(document.createElement("span"), { textContent: text })));
  for (const w of r.warnings) {
    out.append(Object.assign(document.createElement("span"), { className: "thv-warning", textContent: w }));
  }
  out.dataset.warnings = String(r.warnings.length);
  return r;
}

async function applyThreshold() {
  const preview = await previewThreshold();
  if (!preview) return;
  const warnings = preview.warnings;
  if (warnings.length && !window.confirm(`Apply threshold ${num(thv.threshold)}?\n\n${warnings.join("\n")}`)) {
    say(`Threshold not changed: ${warnings.join("; ")}.`, true);
    return;
  }
  const r = await api("PUT", `/categories/${enc(thv.category)}/threshold`, { threshold: thv.threshold });
  say(`${r.category} version ${r.version}: threshold ${num(r.decision.threshold)}.`);
  await loadProducts();  // its event reloads the histogram for the new version
}

function syncThresholdProducts() {
  const pick = $("thv-category");
  const current = pick.value || state.selected;
  pick.replaceChildren(...state.products.map((p) => new Option(p.category, p.category)));
  if (state.products.some((p) => p.category === current)) pick.value = current;
  const product = state.products.find((p) => p.category === pick.value);
  if (product && (!thv.data || thv.category !== product.category || thv.data.version !== product.active_version)) {
    loadScores().catch((e) => fail(e, "Scores"));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  const chart = $("thv-chart");
  chart.addEventListener("pointerdown", (e) => {
    if (!thv.data) return;
    chart.setPointerCapture(e.pointerId);
    chart.dataset.dragging = "true";
    moveTo(e.clientX);
  });
  chart.addEventListener("pointermove", (e) => { if (chart.dataset.dragging) moveTo(e.clientX); });
  for (const end of ["pointerup", "pointercancel"]) chart.addEventListener(end, () => delete chart.dataset.dragging);
  chart.addEventListener("keydown", (e) => {
    const step = { ArrowLeft: -1, ArrowRight: 1 }[e.key];
    if (!thv.data || !step) return;
    e.preventDefault();
    thv.threshold = Math.max(0, Math.min(thv.hi, thv.threshold + step * (thv.hi - thv.lo) / 200));
    placeLine();
    showLive();
  });
  $("thv-category").addEventListener("change", guard("Scores", loadScores));
  $("thv-preview").addEventListener("click", guard("Preview", previewThreshold));
  $("thv-apply").addEventListener("click", guard("Apply", applyThreshold));
  document.addEventListener("clipshot:products", syncThresholdProducts);
});
