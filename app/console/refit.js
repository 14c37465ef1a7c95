// Registration, feedback and shot removal as jobs: the request answers 202 at once (after the server checked
// every field and image) and the bar follows GET /v1/jobs/{id}, whose stage and done/total come from the fit
// itself, until the job is final; then the caller shows the result exactly as the synchronous answer.
"use strict";

const REFIT_POLL_MS = 250;

function showRefit(job, label) {
  $("refit").hidden = false;
  $("refit-label").textContent = label;
  $("refit-progress").value = job.progress || 0;
  $("refit").dataset.state = job.state;
  const count = job.total_steps ? ` ${job.step ?? 0}/${job.total_steps}` : "";
  $("refit-stage").textContent = job.state === "succeeded" ? `done: version ${job.result_version} serves`
    : job.error ? job.error : job.stage ? `${job.stage}${count}` : job.state;
}

// `path` without a query; `body` a FormData or null. Resolves with the body the synchronous call answers.
async function refitJob(method, path, body, label) {
  const started = await api(method, `${path}?wait=false`, body);
  if (!started || started.kind === undefined) return started;  // an older server answered synchronously
  showRefit(started, label);
  for (;;) {
    await new Promise((resolve) => setTimeout(resolve, REFIT_POLL_MS));
    const job = await api("GET", `/jobs/${enc(started.id)}`);
    showRefit(job, label);
    if (job.state === "succeeded") return job.result;
    if (TERMINAL.has(job.state)) {
      const code = (job.error || "").split(":")[0] || job.state;  // errors read "<code>: <message>"
      throw new ApiError(409, code, job.error || `${label}: ${job.state}`);
    }
  }
}
