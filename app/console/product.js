// clipshot console, Product page (#product/<name>): one product's versions (activate = promote or roll back, pins),
// delete, its shots as thumbnails with remove, the geometry and scoring its active version uses, and a chart of
// the verdict rate and normalised-score drift over time from the inspection record, against its calibration.
// Uses console.js's api/apiBlob/state/loadProducts; reached from the "page" link of each products-table row.
"use strict";

// One closure: the console's scripts share the page's global scope, and these names are this view's own.
(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PAGE_THUMB = 160;  // px: the shot grid's thumbnails (the server bounds them at 512)
  const RANGES = { "hour:24": "last 24 hours, hourly", "hour:168": "last 7 days, hourly",
                   "day:30": "last 30 days, daily" };
  const pageView = { category: null, shown: null };

  function pageCategory() {
    const match = location.hash.match(/^#product\/(.+)$/);
    return match ? decodeURIComponent(match[1]) : null;
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  // --- the page ------------------------------------------------------------------------------------------

  async function showPage() {
    const category = pageCategory();
    $("product-page").hidden = !category;
    document.querySelector("main").hidden = Boolean(category);
    if (!category) { pageView.category = null; return; }
    $("page-name").textContent = category;
    const product = state.products.find((p) => p.category === category);
    if (!product || !product.versions) {
      $("page-note").textContent = state.products.length || state.key
        ? `No product ${category} on this server (deleted?).` : "Connect with a key to see this product.";
      for (const id of ["page-versions", "page-shots", "page-geometry", "page-scoring", "page-chart"]) {
        $(id).replaceChildren();
      }
      return;
    }
    const first = pageView.category !== category;
    pageView.category = category;
    $("page-note").textContent = `Serving version ${product.active_version ?? "—"} of ${product.versions.length}; `
      + `${product.shots} good shot(s).`;
    renderVersions(product);
    renderFacts(product);
    const shown = `${category}@${product.active_version}`;
    if (first || pageView.shown !== shown) {  // shots and trend change with the serving version only
      pageView.shown = shown;
      await Promise.all([loadPageShots(category), loadTrend(category)]);
    }
  }

  function renderVersions(product) {
    const active = product.active_version;
    $("page-versions").replaceChildren(...product.versions.map((v) => {
      const row = document.createElement("tr");
      row.dataset.version = v.version;
      row.classList.toggle("active", v.active);
      const threshold = v.metrics ? v.metrics.threshold : undefined;
      for (const cell of [`v${v.version}`, (v.created || "").replace("T", " ").slice(0, 16), v.kind || "—",
                          v.shots ?? "—", num(threshold), (v.scoring && v.scoring.image_score) || "—",
                          v.pinned === true ? "pinned" : v.pinned === false ? "" : "?"]) {
        row.append(el("td", cell));
      }
      const actions = el("td");
      if (v.active) {
        actions.append(el("strong", "active", "active-mark"));
      } else {
        const go = el("button", active !== null && v.version < active ? "roll back" : "activate", "small activate");
        go.type = "button";
        go.disabled = Boolean(v.error);
        go.title = v.error ? `unusable: ${v.error}` : `Serve version ${v.version} from the next request on`;
        go.addEventListener("click", guard("Activate", () => activateVersion(product.category, v.version)));
        actions.append(go);
      }
      const pin = el("button", v.pinned ? "unpin" : "pin", "small pin");
      pin.type = "button";
      pin.title = "Pinned versions are never deleted by version retention (CLIPSHOT_KEEP_VERSIONS)";
      pin.addEventListener("click", guard("Pin", async () => {
        await api(v.pinned ? "DELETE" : "PUT", `/categories/${enc(product.category)}/versions/${v.version}/pin`);
        await loadProducts();
      }));
      actions.append(" ", pin);
      row.append(actions);
      return row;
    }));
  }

  async function activateVersion(category, version) {
    const r = await api("POST", `/categories/${enc(category)}/versions/${version}/activate`);
    say(`${category} now serves version ${r.active_version}.`);
    await loadProducts();
  }

  async function deleteProduct() {
    const product = state.products.find((p) => p.category === pageView.category);
    if (!product) return;
    if (!window.confirm(`Delete ${product.category} with its ${product.versions.length} version(s) and `
        + `${product.shots} shot(s)? This cannot be undone (its inspection record stays).`)) return;
    await api("DELETE", `/categories/${enc(product.category)}`);
    say(`Deleted ${product.category}.`);
    if (state.selected === product.category) state.selected = null;
    location.hash = "";
    await loadProducts();
  }

  function factList(target, facts) {
    target.replaceChildren(...Object.entries(facts || {}).flatMap(([key, value]) => {
      const shown = value === null || value === undefined ? "—" : Array.isArray(value) ? value.join(" × ")
        : typeof value === "object" ? JSON.stringify(value) : String(value);
      const dd = el("dd", shown);
      dd.dataset.field = key;
      return [el("dt", key.replaceAll("_", " ")), dd];
    }));
  }

  // Whether the version divides its maps by its own normal level per position, and on what evidence.
  function levelChoice(version) {
    const weighed = version.position_baseline, mode = version.scoring && version.scoring.position_baseline;
    if (!weighed) return mode || "off";
    if (weighed.reason) return `${weighed.mode}: ${weighed.chosen} (${weighed.reason})`;
    const sep = (side) => num(weighed[side] && weighed[side].separation, 3);
    return `${weighed.mode}: ${weighed.chosen} (separation plain ${sep("plain")}, divided ${sep("divided")})`;
  }

  function renderFacts(product) {
    const active = product.versions.find((v) => v.active) || {};
    factList($("page-geometry"), active.geometry || { geometry: "not stored (chosen from the image sizes)" });
    factList($("page-scoring"), active.scoring ? { ...active.scoring, position_baseline: levelChoice(active) }
      : { scoring: "not reported" });
    const selection = active.scoring_selection;
    const box = $("page-selection");
    if (!selection) {
      box.replaceChildren(el("p", "Scoring fixed by the settings (not chosen from the shots).", "muted"));
      return;
    }
    const table = el("table");
    const head = el("tr");
    for (const h of ["candidate", "image AUROC", "pixel AUROC", "separation"]) head.append(el("th", h));
    table.append(head);
    for (const c of selection.candidates || []) {
      const row = el("tr", null, c.name === selection.chosen ? "chosen" : "");
      for (const cell of [c.name + (c.name === selection.chosen ? " (chosen)" : ""), num(c.image_separation, 3),
                          num(c.pixel_separation, 3), num(c.separation, 3)]) row.append(el("td", cell));
      table.append(row);
    }
    box.replaceChildren(el("p", `Chosen from the shots: ${selection.chosen} (${selection.rule}).`, "muted"), table);
  }

  // --- shots ---------------------------------------------------------------------------------------------

  async function loadPageShots(category) {
    const data = await api("GET", `/categories/${enc(category)}/shots`);
    $("page-shots").replaceChildren(...data.shots.map((shot) => {
      const card = el("figure", null, "shot");
      card.dataset.sha256 = shot.sha256;
      const img = el("img");
      img.alt = shot.file_name || shot.sha256.slice(0, 12);
      apiBlob(`/categories/${enc(category)}/shots/${shot.sha256}/thumbnail?size=${PAGE_THUMB}`)
        .then((blob) => { img.src = URL.createObjectURL(blob); img.onload = () => URL.revokeObjectURL(img.src); })
        .catch(() => { img.alt = "thumbnail unavailable"; });
      const caption = el("figcaption", `${shot.file_name || shot.sha256.slice(0, 12)} · ${shot.source}`);
      const remove = el("button", "remove", "small remove");
      remove.type = "button";
      remove.title = "Fit a new version without this shot (the old version keeps it: roll back to undo)";
      remove.addEventListener("click", guard("Remove shot", async () => {
        remove.disabled = true;
        remove.textContent = "removing…";  // the re-fit takes seconds on a CPU
        try {
          const r = await api("DELETE", `/categories/${enc(category)}/shots/${shot.sha256}`);
          say(`Removed a shot: ${category} is now version ${r.version} (${r.shots} shots).`);
          await loadProducts();
        } finally {
          remove.disabled = false;
          remove.textContent = "remove";
        }
      }));
      caption.append(" ", remove);
      card.append(img, caption);
      return card;
    }));
  }

  // --- trend chart ---------------------------------------------------------------------------------------

  async function loadTrend(category) {
    const [bucket, count] = $("page-range").value.split(":");
    const hours = bucket === "day" ? 24 : 1;
    const since = new Date(Date.now() - (Number(count) - 1) * hours * 3600e3).toISOString();
    const trend = await api("GET", `/categories/${enc(category)}/inspections/trend?bucket=${bucket}`
      + `&since=${enc(since)}`);
    drawTrend(trend);
  }

  function svg(parent, tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    parent.append(node);
    return node;
  }

  // An axis from 0 whose top is a multiple of a round step, with at most `most` steps.
  function axis(high, steps, most) {
    const step = steps.find((s) => Math.ceil(high / s) <= most) || steps[steps.length - 1];
    return { step, top: Math.max(step, Math.ceil(high / step - 1e-9) * step) };
  }

  // Bars: the anomalous rate per bucket (right axis). Lines: mean and p95 of the normalised score (left axis,
  // 1.0 = the threshold), with the calibration's leave-one-out mean and p95 dashed: drift is the solid lines
  // leaving the dashed ones; a rate well above the expected false alarms is a process (or model) change.
  function drawTrend(trend) {
    const W = 860, H = 300, L = 48, R = 56, T = 12, B = 62;
    const buckets = trend.buckets, ref = trend.reference;
    const scores = buckets.flatMap((b) => [b.score_p95, b.score_mean]).filter((v) => v !== null);
    const left = axis(Math.max(1.2, ...scores, ref && ref.score_p95 ? ref.score_p95 : 0), [0.2, 0.5, 1, 2, 5, 10], 8);
    const rates = buckets.map((b) => b.anomalous_rate).filter((v) => v !== null);
    const expected = ref ? ref.expected_false_alarm_rate : null;
    const right = axis(Math.max(0.05, ...rates, expected || 0), [0.01, 0.02, 0.05, 0.1, 0.2, 0.25], 5);
    const n = Math.max(1, buckets.length), slot = (W - L - R) / n, bottom = H - B;
    const x = (i) => L + slot * (i + 0.5), y = (s) => T + (bottom - T) * (1 - s / left.top);
    const yr = (r) => T + (bottom - T) * (1 - r / right.top);
    const chart = document.createElementNS(SVG_NS, "svg");
    chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
    chart.setAttribute("class", "trend");
    chart.setAttribute("role", "img");
    chart.setAttribute("aria-label", "verdict rate and normalised score per time bucket");
    svg(chart, "rect", { x: L, y: T, width: W - L - R, height: bottom - T, class: "frame" });
    for (let s = 0; s <= left.top + 1e-9; s += left.step) {
      svg(chart, "text", { x: L - 6, y: y(s) + 4, class: "tick", "text-anchor": "end" }, s.toFixed(1));
    }
    for (let r = 0; r <= right.top + 1e-9; r += right.step) {
      svg(chart, "text", { x: W - R + 6, y: yr(r) + 4, class: "tick rate" }, `${Math.round(100 * r)} %`);
    }
    const bars = svg(chart, "g", { class: "bars" });
    buckets.forEach((b, i) => {
      if (b.anomalous_rate === null) return;
      const bar = svg(bars, "rect", { x: x(i) - slot * 0.35, y: yr(b.anomalous_rate), width: slot * 0.7,
                                       height: bottom - yr(b.anomalous_rate), class: "rate-bar" });
      svg(bar, "title", {}, `${b.start.slice(0, 16).replace("T", " ")}: ${b.anomalous}/${b.inspections} `
        + `anomalous (${pct(b.anomalous_rate)}), mean ${num(b.score_mean, 2)}, p95 ${num(b.score_p95, 2)}`);
    });
    const level = (value, cls, scale) => svg(chart, "line", { x1: L, x2: W - R, y1: scale(value), y2: scale(value),
                                                             class: cls });
    const legend = [["rate-bar", "anomalous rate (right)"], ["series p95", "p95 of score / threshold"],
                    ["series mean", "mean of score / threshold"], ["threshold", "threshold (1.0)"]];
    level(1, "threshold", y);
    if (ref && ref.score_p95 !== null) {
      level(ref.score_p95, "ref-p95", y);
      legend.push(["ref-p95", `good shots' p95 (v${ref.version} calibration)`]);
    }
    if (ref && ref.score_mean !== null) {
      level(ref.score_mean, "ref-mean", y);
      legend.push(["ref-mean", "good shots' mean"]);
    }
    if (expected !== null && expected !== undefined) {
      level(expected, "ref-rate", yr);
      legend.push(["ref-rate", "expected false alarms (right)"]);
    }
    for (const [key, cls] of [["score_p95", "p95"], ["score_mean", "mean"]]) {
      let d = "", pen = "M";
      buckets.forEach((b, i) => {
        if (b[key] === null) { pen = "M"; return; }
        d += `${pen}${x(i).toFixed(1)},${y(b[key]).toFixed(1)} `;
        pen = "L";
        svg(chart, "circle", { cx: x(i), cy: y(b[key]), r: 2.5, class: `dot ${cls}` });
      });
      if (d) svg(chart, "path", { d, class: `series ${cls}` });
    }
    const every = Math.max(1, Math.ceil(n / 8));
    buckets.forEach((b, i) => {
      if (i % every) return;
      const label = trend.bucket === "day" ? b.start.slice(5, 10) : b.start.slice(5, 13).replace("T", " ") + "h";
      svg(chart, "text", { x: x(i), y: bottom + 15, class: "tick", "text-anchor": "middle" }, label);
    });
    let lx = L, ly = bottom + 34;
    for (const [cls, text] of legend) {  // a sample of each mark, then its meaning; wraps to a second row
      const width = 28 + 6 * text.length;
      if (lx + width > W - R) { lx = L; ly += 16; }
      if (cls === "rate-bar") svg(chart, "rect", { x: lx, y: ly - 8, width: 14, height: 9, class: cls });
      else if (cls.startsWith("series")) svg(chart, "path", { d: `M${lx},${ly - 4} h16`, class: cls });
      else svg(chart, "line", { x1: lx, x2: lx + 16, y1: ly - 4, y2: ly - 4, class: cls });
      svg(chart, "text", { x: lx + 20, y: ly, class: "legend" }, text);
      lx += width;
    }
    $("page-chart").replaceChildren(chart);
    const total = buckets.reduce((sum, b) => sum + b.inspections, 0);
    const anomalous = buckets.reduce((sum, b) => sum + b.anomalous, 0);
    $("page-chart-note").textContent = total
      ? `${total} inspection(s), ${anomalous} anomalous, ${trend.bucket}ly buckets (UTC) from `
        + `${trend.since.slice(0, 16).replace("T", " ")}.` + (ref ? ` Reference: version ${ref.version}'s good shots `
        + `score ${num(ref.score_mean, 2)} on average, p95 ${num(ref.score_p95, 2)} of the threshold; it expects `
        + `${pct(expected)} false alarms.` : "")
      : "No recorded inspections in this range (is the record on? CLIPSHOT_RECORD_MODE).";
  }

  // --- wiring --------------------------------------------------------------------------------------------

  function linkProductRows() {
    for (const row of $("product-list").querySelectorAll("tr[data-category]")) {
      if (row.cells[0].querySelector(".open-page")) continue;
      const link = el("a", "page ›", "open-page small");
      link.href = `#product/${enc(row.dataset.category)}`;
      link.title = "Versions, shots, geometry, scoring and the verdict trend of this product";
      row.cells[0].append(" ", link);
    }
    if (pageCategory()) guard("Product page", showPage)();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("page-range").replaceChildren(...Object.entries(RANGES).map(([value, label]) => new Option(label, value)));
    $("page-range").addEventListener("change", guard("Trend", () => pageView.category && loadTrend(pageView.category)));
    $("page-delete").addEventListener("click", guard("Delete", deleteProduct));
    $("page-back").addEventListener("click", (e) => { e.preventDefault(); location.hash = ""; });
    window.addEventListener("hashchange", guard("Product page", () => {  // opened: read the product afresh
      pageView.shown = null;
      return pageCategory() && state.key ? loadProducts() : showPage();
    }));
    document.addEventListener("clipshot:products", linkProductRows);
  });
})();
