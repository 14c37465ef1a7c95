// clipshot console, History: a product's recorded inspections (newest first, filtered, a page at a time) with
// their kept thumbnails, and one-click feedback that sends the kept image back as a good part or a defect.
// Uses console.js's api/apiBlob/state; the record must be on (CLIPSHOT_RECORD_MODE) for rows to exist.
"use strict";

const HISTORY_PAGE = 24;  // rows per page: a screenful of thumbnails
// "Unsure only" lists verdicts whose p-value against them is at least this: the conventional 5 % level, below
// which the product's own evidence speaks clearly for the verdict.
const UNSURE_P = 0.05;
const historyView = { category: null, cursor: null, query: "" };

function historyQuery() {
  const params = new URLSearchParams({ limit: String(HISTORY_PAGE) });
  if ($("hist-verdict").value) params.set("verdict", $("hist-verdict").value);
  if ($("hist-min").value.trim() !== "") params.set("min_score", $("hist-min").value.trim());
  if ($("hist-max").value.trim() !== "") params.set("max_score", $("hist-max").value.trim());
  if ($("hist-unsure").checked) params.set("min_p_value", String(UNSURE_P));
  return params;
}

async function showHistory(more = false) {
  const category = more ? historyView.category : $("hist-category").value;
  if (!category) { say("Register or select a product first.", true); return; }
  const params = more ? new URLSearchParams(historyView.query) : historyQuery();
  if (more) params.set("cursor", historyView.cursor);
  const page = await api("GET", `/categories/${enc(category)}/inspections?${params}`);
  if (!more) {
    historyView.category = category;
    historyView.query = params.toString();
    $("history").replaceChildren();
  }
  historyView.cursor = page.next_cursor;
  $("history").append(...page.inspections.map((row) => inspectionCard(category, row)));
  $("hist-more").hidden = !page.next_cursor;
  const shown = $("history").children.length;
  $("hist-note").textContent = shown ? `${shown} inspection(s), newest first${page.next_cursor ? "" : " (all)"}.`
    : "No recorded inspections match (is the record on? CLIPSHOT_RECORD_MODE).";
}

function inspectionCard(category, row) {
  const card = $("inspection-template").content.firstElementChild.cloneNode(true);
  card.dataset.id = row.id;
  card.dataset.verdict = row.verdict;
  const verdict = card.querySelector(".verdict");
  verdict.textContent = row.verdict.toUpperCase();
  verdict.classList.add(row.verdict);
  card.querySelector(".score").textContent = `${num(row.score)} (v${row.version ?? "?"})`;
  const sure = card.querySelector(".sure");
  if (row.p_value !== null && row.p_value !== undefined) {
    card.dataset.pValue = row.p_value;
    sure.textContent = row.p_value < UNSURE_P ? `sure (p ${num(row.p_value)})` : `unsure (p ${num(row.p_value)})`;
    sure.title = "The p-value that speaks against this verdict, from the product's own good (and defect) "
      + "evidence: small = a sure verdict. It cannot go below 1/(n+1) with n good images.";
  }
  card.querySelector(".when").textContent = row.time.replace("T", " ").slice(0, 19);
  card.querySelector(".origin").textContent = [row.part_id, row.line, row.camera, row.filename]
    .filter(Boolean).join(" · ");
  const base = `/categories/${enc(category)}/inspections/${row.id}`;
  const kept = Boolean(row.image_path);
  if (kept) {
    apiBlob(`${base}/thumbnail`).then((blob) => { card.querySelector(".thumb").src = URL.createObjectURL(blob); })
      .catch(() => {});  // removed by retention meanwhile: the row stays without a picture
  }
  const out = card.querySelector(".feedback-result");
  for (const [selector, label] of [[".mark-good", "good"], [".mark-defect", "defect"]]) {
    const button = card.querySelector(selector);
    button.disabled = !kept;
    button.title = kept ? `Send the kept image as a ${label === "good" ? "good part" : "defect"}`
      : "The record kept no image of this inspection (CLIPSHOT_RECORD_MODE=verdicts or retention): "
        + "feedback needs the picture; use record mode thumbnails or full";
    button.addEventListener("click", () => historyFeedback(base, row, label)
      .then((r) => { out.textContent = feedbackText(r); card.dataset.feedback = label; })
      .catch((e) => fail(e, "Feedback")));
  }
  return card;
}

async function historyFeedback(base, row, label) {
  const blob = await apiBlob(`${base}/image`);
  const name = row.filename || `inspection-${row.id}`;
  return feedback(historyView.category, new File([blob], name, { type: blob.type }), label);
}

function syncHistoryProducts() {
  const pick = $("hist-category");
  const current = pick.value || state.selected;
  pick.replaceChildren(...state.products.map((p) => new Option(p.category, p.category)));
  if (state.products.some((p) => p.category === current)) pick.value = current;
}

document.addEventListener("DOMContentLoaded", () => {
  $("history-form").addEventListener("submit", (e) => { e.preventDefault(); guard("History", showHistory)(); });
  $("hist-more").addEventListener("click", guard("History", () => showHistory(true)));
  document.addEventListener("clipshot:products", syncHistoryProducts);
});
