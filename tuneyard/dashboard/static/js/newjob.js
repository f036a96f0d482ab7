// A new job: upload (validated by the API, its line-numbered problems shown beside the file), pick a model, set
// the common hyperparameters ("auto" by default) and send the body the OpenAI SDK sends to POST /fine_tuning/jobs.
import { call, get, post, listAll } from "./api.js";
import { h, clear, announce } from "./dom.js";

const HP = [
  { name: "n_epochs", label: "Epochs", hint: "1–50 or auto", methods: ["supervised", "dpo"] },
  { name: "batch_size", label: "Batch size", hint: "1–256 or auto", methods: ["supervised", "dpo"] },
  { name: "learning_rate_multiplier", label: "Learning rate multiplier", hint: "> 0 or auto",
    methods: ["supervised", "dpo"] },
  { name: "beta", label: "DPO beta", hint: "(0, 2] or auto", methods: ["dpo"] },
];

/** The problems of an API message, one per item: the API joins several with "; " after a count. */
export function problemsOf(message) {
  const m = message.match(/^(.*?\bhas \d+ errors): (.*)$/s);
  if (!m) return [message];
  return [m[1], ...m[2].split("; ")];
}

function fileField(id, label, files, required) {
  const select = h("select", { id: `${id}-select`, "data-param": id, "aria-describedby": `${id}-status` },
    h("option", { value: "" }, required ? "— choose or upload —" : "— none —"));
  const input = h("input", { id: `${id}-upload`, type: "file", accept: ".jsonl,.json,.csv,.parquet",
    "aria-describedby": `${id}-status` });
  const status = h("div", { id: `${id}-status`, "aria-live": "polite" });
  const setOptions = (list) => {
    const keep = select.value;
    clear(select, select.firstChild, list.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`)));
    select.value = keep;
  };
  setOptions(files);
  input.addEventListener("change", async () => {
    const file = input.files[0];
    if (!file) return;
    clear(status, h("span", { class: "muted" }, `Uploading ${file.name}…`));
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    try {
      const f = await call("POST", "/files", { form });
      files.unshift(f);
      setOptions(files);
      select.value = f.id;
      select.removeAttribute("aria-invalid");
      clear(status, h("p", { class: "ok" }, `✓ ${f.filename} uploaded as ${f.id} (${f.bytes} bytes, ${f.status})`));
      announce(`${f.filename} uploaded`);
    } catch (e) {
      select.setAttribute("aria-invalid", "true");
      clear(status, h("div", { class: "error", role: "alert" },
        h("p", {}, `${file.name} was refused:`),
        h("ul", { class: "problems" }, problemsOf(e.message).map((p) => h("li", {}, p)))));
    }
  });
  return { select, root: h("div", { class: "field" },
    h("label", { for: `${id}-select` }, label), h("div", { class: "row" }, select,
      h("span", {}, h("label", { for: `${id}-upload`, class: "sr-only" }, `Upload a ${label.toLowerCase()}`), input)),
    status) };
}

function value(input) {
  const v = input.value.trim();
  if (v === "" || v === "auto") return "auto";
  const n = Number(v);
  return Number.isFinite(n) ? n : v; // the API names a value it cannot take
}

export async function render(root) {
  const [files, models] = await Promise.all([
    listAll("/files", { purpose: "fine-tune", limit: 100 }, 500).catch(() => []),
    get("/models").then((r) => r.data).catch(() => []),
  ]);
  const train = fileField("training_file", "Training file", files, true);
  const valid = fileField("validation_file", "Validation file", files, false);
  const model = h("input", { id: "model", list: "model-list", required: true, "data-param": "model",
    placeholder: "a listed model, a local path or a hub id", "aria-describedby": "model-hint" });
  const modelList = h("datalist", { id: "model-list" }, models.map((m) => h("option", { value: m.id })));
  const method = h("select", { id: "method", "data-param": "method" },
    h("option", { value: "supervised" }, "supervised"), h("option", { value: "dpo" }, "dpo"));
  const suffix = h("input", { id: "suffix", maxlength: 64, "data-param": "suffix" });
  const seed = h("input", { id: "seed", type: "number", min: 0, "data-param": "seed", placeholder: "random" });
  const metadata = h("textarea", { id: "metadata", rows: 2, "data-param": "metadata",
    placeholder: "experiment=baseline", "aria-describedby": "metadata-hint" });
  const hp = HP.map((p) => ({ ...p, input: h("input", { id: `hp-${p.name}`, value: "auto",
    "data-param": p.name, "aria-describedby": `hp-${p.name}-hint` }) }));
  const hpFields = hp.map((p) => h("div", { class: "field", "data-methods": p.methods.join(" ") },
    h("label", { for: p.input.id }, p.label), p.input, h("p", { class: "hint", id: `hp-${p.name}-hint` }, p.hint)));
  const showHp = () => hpFields.forEach((f, i) => { f.hidden = !hp[i].methods.includes(method.value); });
  method.addEventListener("change", showHp);
  showHp();
  const error = h("div", { class: "error", role: "alert", id: "submit-error" });
  const submit = h("button", { type: "submit", class: "primary" }, "Create job");

  const body = () => {
    const hyper = Object.fromEntries(hp.filter((p) => p.methods.includes(method.value))
      .map((p) => [p.name, value(p.input)]));
    const out = { model: model.value.trim(), training_file: train.select.value,
      method: { type: method.value, [method.value]: { hyperparameters: hyper } } };
    if (valid.select.value) out.validation_file = valid.select.value;
    if (suffix.value.trim()) out.suffix = suffix.value.trim();
    if (seed.value.trim()) out.seed = Number(seed.value);
    const meta = metadata.value.split("\n").map((l) => l.trim()).filter(Boolean);
    if (meta.length) out.metadata = Object.fromEntries(meta.map((l) => [l.split("=")[0].trim(),
      l.includes("=") ? l.slice(l.indexOf("=") + 1).trim() : ""]));
    return out;
  };

  const form = h("form", { id: "new-job", novalidate: true, onsubmit: async (ev) => {
    ev.preventDefault();
    clear(error);
    form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
    submit.disabled = true;
    try {
      const job = await post("/fine_tuning/jobs", body());
      announce(`Created ${job.id}`);
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (e) {
      const target = e.param && [...form.querySelectorAll("[data-param]")].find(
        (el) => e.param === el.dataset.param || e.param.endsWith(`.${el.dataset.param}`));
      if (target) {
        target.setAttribute("aria-invalid", "true");
        target.focus();
      }
      clear(error, e.param ? h("p", {}, `Field: ${e.param}`) : null,
        h("ul", { class: "problems" }, problemsOf(e.message).map((p) => h("li", {}, p))));
    } finally {
      submit.disabled = false;
    }
  } },
  train.root, valid.root,
  h("div", { class: "field" }, h("label", { for: "model" }, "Model"), model, modelList,
    h("p", { class: "hint", id: "model-hint" }, `${models.length} model(s) listed by /v1/models; or type one`)),
  h("div", { class: "row" },
    h("div", { class: "field" }, h("label", { for: "method" }, "Method"), method),
    h("div", { class: "field" }, h("label", { for: "suffix" }, "Suffix"), suffix),
    h("div", { class: "field" }, h("label", { for: "seed" }, "Seed"), seed)),
  h("fieldset", {}, h("legend", {}, "Hyperparameters"), h("div", { class: "row" }, hpFields)),
  h("div", { class: "field" }, h("label", { for: "metadata" }, "Metadata"), metadata,
    h("p", { class: "hint", id: "metadata-hint" }, "key=value, one a line (e.g. an experiment name)")),
  error, h("p", {}, submit));

  clear(root, h("h1", {}, "New fine-tuning job"), form);
  return () => {};
}
