// The job list: status, model, where it came from (metadata, integrations), progress, ETA, filter and search.
import { listAll } from "./api.js";
import { h, clear, when, duration, statusBadge, pairs } from "./dom.js";
import { poll } from "./poll.js";

const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];

function progress(job) {
  if (!job.total_steps) return h("span", { class: "muted" }, "—");
  const done = job.trained_steps || 0;
  const pct = Math.round((100 * done) / job.total_steps);
  return h("span", {}, h("progress", { max: job.total_steps, value: done, "aria-label": `${pct}% trained` }),
    ` ${done}/${job.total_steps}`);
}

function eta(job) {
  return job.estimated_finish ? duration(job.estimated_finish - Date.now() / 1000) : "—";
}

function matches(job, status, text) {
  if (status && job.status !== status) return false;
  if (!text) return true;
  const hay = [job.id, job.suffix, job.model, job.fine_tuned_model, ...Object.values(job.metadata || {}),
    ...(job.integrations || []).map((i) => JSON.stringify(i))].filter(Boolean).join(" ").toLowerCase();
  return hay.includes(text.toLowerCase());
}

export function render(root) {
  const status = h("select", { id: "filter-status" }, h("option", { value: "" }, "all"),
    STATUSES.map((s) => h("option", { value: s }, s)));
  const search = h("input", { id: "filter-text", type: "search", placeholder: "id, suffix, metadata…" });
  const count = h("p", { class: "muted", id: "jobs-count", "aria-live": "polite" });
  const body = h("tbody");
  const compare = h("button", { type: "button", disabled: true, onclick: () => {
    const ids = [...body.querySelectorAll("input[type=checkbox]:checked")].map((c) => c.value);
    location.hash = `#/compare/${ids.map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  let jobs = [];
  const selected = new Set();

  const draw = () => {
    // Rows are rebuilt on every poll: keep the keyboard focus on the same control.
    const a = document.activeElement;
    const focusKey = body.contains(a) ? (a.getAttribute("aria-label") || a.getAttribute("href")) : null;
    const shown = jobs.filter((j) => matches(j, status.value, search.value.trim()));
    count.textContent = `${shown.length} of ${jobs.length} job(s)`;
    clear(body, shown.map((j) => h("tr", { "data-job": j.id },
      h("td", {}, h("input", { type: "checkbox", value: j.id, checked: selected.has(j.id),
        "aria-label": `Select ${j.id} to compare`, onchange: (ev) => {
          if (ev.target.checked) selected.add(j.id); else selected.delete(j.id);
          compare.disabled = selected.size < 2;
        } })),
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.id),
        j.suffix ? h("div", { class: "muted" }, j.suffix) : null),
      h("td", { class: "job-status" }, statusBadge(j.status)),
      h("td", {}, j.model),
      h("td", {}, pairs(j.metadata), (j.integrations || []).length
        ? h("div", { class: "muted" }, j.integrations.map((i) => i.type).join(", ")) : null),
      h("td", {}, progress(j)),
      h("td", {}, eta(j)),
      h("td", {}, when(j.created_at)),
      h("td", {}, when(j.finished_at)))));
    compare.disabled = selected.size < 2;
    if (focusKey) {
      const again = [...body.querySelectorAll("a, input")].find(
        (el) => (el.getAttribute("aria-label") || el.getAttribute("href")) === focusKey);
      if (again) again.focus();
    }
  };
  status.addEventListener("change", draw);
  search.addEventListener("input", draw);

  clear(root,
    h("h1", {}, "Fine-tuning jobs"),
    h("div", { class: "toolbar" },
      h("div", {}, h("label", { for: "filter-status" }, "Status"), status),
      h("div", {}, h("label", { for: "filter-text" }, "Search"), search),
      compare, h("a", { href: "#/new" }, "New job")),
    count,
    h("table", { id: "jobs" },
      h("caption", { class: "sr-only" }, "Fine-tuning jobs, newest first"),
      h("thead", {}, h("tr", {}, ["", "Job", "Status", "Model", "Metadata / integrations", "Progress", "ETA",
        "Created", "Finished"].map((t) => h("th", { scope: "col" }, t)))),
      body));

  return poll(async () => {
    jobs = await listAll("/fine_tuning/jobs", { limit: 100 }, 1000);
    draw();
  }, 2000);
}
