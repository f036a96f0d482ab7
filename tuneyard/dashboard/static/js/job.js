// One job: its resolved spec, live loss / learning-rate / throughput curves from its metrics events, the event
// log, checkpoints, the error of a failed job, cancel / pause / resume, and a chat box once it has succeeded.
import { get, post, listAll, download, ApiError } from "./api.js";
import { h, clear, when, duration, statusBadge, pairs, announce, confirmAction, TERMINAL } from "./dom.js";
import { Chart } from "./chart.js";
import { EventFeed } from "./events.js";
import { poll } from "./poll.js";
import { chatBox } from "./chat.js";

const CHECKPOINT_METRICS = ["train_loss", "valid_loss", "train_mean_token_accuracy", "valid_mean_token_accuracy"];
const REWARDS = ["rewards_chosen", "rewards_rejected", "rewards_margins"];
const ACTIONS = {
  cancel: { label: "Cancel", can: (j) => !TERMINAL.has(j.status), ask: "Cancel job {id}? It cannot be resumed." },
  pause: { label: "Pause", can: (j) => ["queued", "running"].includes(j.status),
    ask: "Pause job {id}? It stops at the next step with a checkpoint and can be resumed." },
  resume: { label: "Resume", can: (j) => j.status === "paused", ask: "Resume job {id} from its pause checkpoint?" },
};

const num = (v, digits = 4) => (typeof v === "number" ? Number(v.toPrecision(digits)).toString() : "—");

function facts(rows) {
  return h("dl", { class: "facts" }, rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "—")]));
}

export function render(root, jobId) {
  const path = `/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  const feed = new EventFeed(jobId);
  const title = h("h1", {}, jobId);
  const badge = h("span", { id: "job-status" });
  const message = h("p", { class: "error", role: "alert", id: "action-error" });
  const actions = h("div", { class: "actions" });
  const errorBox = h("div", { id: "job-error" });
  const summary = h("div", { class: "panel" });
  const spec = h("div", { class: "panel" });
  const charts = h("div", { class: "grid", id: "charts" });
  const log = h("ol", { class: "events", role: "log", "aria-label": "Event log", id: "events", tabindex: "0" });
  const ckBody = h("tbody");
  const results = h("div", { id: "result-files" });
  const chat = h("div", { id: "chat" });
  const loss = new Chart(charts, { title: "Loss", labels: ["train_loss", "valid_loss"], id: "loss" });
  const lr = new Chart(charts, { title: "Learning rate", labels: ["learning_rate"], id: "learning_rate" });
  const tps = new Chart(charts, { title: "Tokens per second", labels: ["tokens_per_second"], id: "tokens_per_second" });
  let rewards = null;
  let job = null;
  let chatShown = false;

  for (const [name, a] of Object.entries(ACTIONS)) {
    actions.append(h("button", { type: "button", id: `job-${name}`, class: name === "cancel" ? "danger" : "",
      disabled: true, onclick: async () => {
        if (!(await confirmAction(a.ask.replace("{id}", jobId)))) return;
        message.textContent = "";
        try {
          job = await post(`${path}/${name}`);
          announce(`Job ${jobId}: ${job.status}`);
          drawJob();
          refresh();
        } catch (e) {
          message.textContent = e.message;
        }
      } }, a.label));
  }

  clear(root,
    h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")),
    h("div", { class: "toolbar" }, title, badge, actions),
    message, errorBox,
    h("div", { class: "grid" }, summary, spec),
    h("h2", {}, "Metrics"), charts,
    h("div", { class: "grid" },
      h("section", { class: "panel", "aria-labelledby": "events-h" }, h("h2", { id: "events-h" }, "Events"), log),
      h("section", { class: "panel", "aria-labelledby": "ck-h" }, h("h2", { id: "ck-h" }, "Checkpoints"),
        h("table", { id: "checkpoints" }, h("thead", {}, h("tr", {}, ["Step", "Train loss", "Valid loss",
          "Train accuracy", "Valid accuracy", ""].map((t) => h("th", { scope: "col", class: "num" }, t)))), ckBody),
        h("p", { class: "hint" }, "Each checkpoint is also a model: the fine-tuned model's name with :ckpt-step-N."),
        results)),
    chat);

  function drawJob() {
    document.title = `${jobId} · tuneyard`;
    clear(badge, statusBadge(job.status));
    for (const [name, a] of Object.entries(ACTIONS)) document.getElementById(`job-${name}`).disabled = !a.can(job);
    if (job.error && job.error.message) {
      clear(errorBox, h("section", { class: "alert", role: "alert", "aria-labelledby": "err-h" },
        h("h2", { id: "err-h" }, "The job failed"),
        facts([["Field", h("code", { id: "error-param" }, job.error.param || "—")],
          ["Code", job.error.code || "—"], ["Message", h("span", { id: "error-message" }, job.error.message)]])));
    } else {
      clear(errorBox);
    }
    const steps = job.total_steps ? `${job.trained_steps || 0} / ${job.total_steps}` : "—";
    clear(summary, h("h2", {}, "Run"), facts([
      ["Model", job.model], ["Fine-tuned model", job.fine_tuned_model], ["Suffix", job.suffix],
      ["Steps", h("span", { id: "job-steps" }, steps)], ["Trained tokens", job.trained_tokens],
      ["ETA", job.estimated_finish ? duration(job.estimated_finish - Date.now() / 1000) : "—"],
      ["Train loss (latest)", num(feed.latest("train_loss"))],
      ["Learning rate (latest)", num(feed.latest("learning_rate"))],
      ["Tokens/s (latest)", num(feed.latest("tokens_per_second"))],
      ["Created", when(job.created_at)], ["Finished", when(job.finished_at)],
      ["Training file", job.training_file], ["Validation file", job.validation_file],
      ["Metadata", pairs(job.metadata)],
      ["Integrations", (job.integrations || []).map((i) => i.type).join(", ") || "—"]]));
    const hp = job.hyperparameters || {};
    clear(spec, h("h2", {}, "Spec (as resolved)"), facts([
      ["Method", job.method ? job.method.type : "—"], ["Seed", job.seed],
      ...Object.keys(hp).sort().map((k) => [k, h("span", { "data-hp": k }, JSON.stringify(hp[k]))])]));
  }

  function drawEvents(fresh) {
    for (const e of fresh) {
      log.prepend(h("li", { class: `level-${e.level}`, "data-event": e.id },
        h("time", { datetime: new Date(e.created_at * 1000).toISOString() }, when(e.created_at)), e.message));
    }
    loss.update([feed.series("train_loss"), feed.series("valid_loss")]);
    lr.update([feed.series("learning_rate")]);
    tps.update([feed.series("tokens_per_second")]);
    const rw = REWARDS.map((r) => feed.series(r));
    if (rw.some((s) => s.length)) {
      rewards = rewards || new Chart(charts, { title: "DPO rewards", labels: REWARDS, id: "rewards" });
      rewards.update(rw);
    }
  }

  function drawCheckpoints(cks) {
    clear(ckBody, cks.map((c) => h("tr", { "data-checkpoint": c.id, title: c.fine_tuned_model_checkpoint },
      h("td", { class: "num" }, c.step_number),
      CHECKPOINT_METRICS.map((m) => h("td", { class: "num" }, num(c.metrics[m]))),
      h("td", {}, h("button", { type: "button", class: "link", "aria-label": `Download checkpoint ${c.step_number}`,
        onclick: () => download(`${path}/checkpoints/${encodeURIComponent(c.id)}/content`, `${c.id}.tar.gz`)
          .catch((e) => { message.textContent = e.message; }) }, "Download")))));
    if (!cks.length) {
      ckBody.append(h("tr", {}, h("td", { colspan: CHECKPOINT_METRICS.length + 2, class: "muted" },
        "No checkpoints yet.")));
    }
  }

  function drawResults() {
    clear(results, (job.result_files || []).map((id) => h("p", {}, h("button", { type: "button", class: "link",
      onclick: () => download(`/files/${encodeURIComponent(id)}/content`, `${id}.csv`)
        .catch((e) => { message.textContent = e.message; }) }, `Download metrics (${id})`))));
    if (job.status === "succeeded" && job.fine_tuned_model && !chatShown) {
      chatShown = true;
      chat.append(chatBox(job.fine_tuned_model));
    }
  }

  async function refresh() {
    try {
      job = await get(path);
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        clear(root, h("h1", {}, "Job not found"), h("p", { class: "error", role: "alert" }, e.message),
          h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")));
        return false;
      }
      throw e;
    }
    const fresh = await feed.refresh();
    drawEvents(fresh);
    drawCheckpoints(await listAll(`${path}/checkpoints`, { limit: 100 }));
    drawJob();
    drawResults();
    root.dataset.loaded = job.status;
    return !TERMINAL.has(job.status);
  }

  const stop = poll(refresh, 1500);
  return () => {
    stop();
    for (const c of [loss, lr, tps, rewards]) if (c) c.destroy();
  };
}
