// Several jobs' training (and validation) loss on one chart.
import { listAll } from "./api.js";
import { h, clear, statusBadge, TERMINAL } from "./dom.js";
import { Chart } from "./chart.js";
import { EventFeed } from "./events.js";
import { poll } from "./poll.js";

export async function render(root, idsText) {
  const chosen = new Set((idsText || "").split(",").filter(Boolean).map(decodeURIComponent));
  const jobs = await listAll("/fine_tuning/jobs", { limit: 100 }, 1000);
  const picks = h("fieldset", { id: "compare-picks" }, h("legend", {}, "Jobs"), jobs.map((j) => h("label", {},
    h("input", { type: "checkbox", value: j.id, checked: chosen.has(j.id), onchange: (ev) => {
      if (ev.target.checked) chosen.add(j.id); else chosen.delete(j.id);
      history.replaceState(null, "", `#/compare/${[...chosen].map(encodeURIComponent).join(",")}`);
      restart();
    } }), ` ${j.id}${j.suffix ? ` (${j.suffix})` : ""} `, statusBadge(j.status))));
  const charts = h("div", { id: "compare-charts" });
  clear(root, h("h1", {}, "Compare jobs"), picks, charts);
  let stop = () => {};
  let chart = null;
  function restart() {
    stop();
    if (chart) chart.destroy();
    clear(charts);
    const ids = [...chosen];
    if (!ids.length) {
      charts.append(h("p", { class: "muted" }, "Pick two or more jobs."));
      return;
    }
    const labels = ids.flatMap((id) => [`${id} train`, `${id} valid`]);
    chart = new Chart(charts, { title: "Loss by step", labels, id: "compare" });
    const feeds = ids.map((id) => new EventFeed(id));
    stop = poll(async () => {
      await Promise.all(feeds.map((f) => f.refresh()));
      chart.update(feeds.flatMap((f) => [f.series("train_loss"), f.series("valid_loss")]));
      // Jobs that had ended when the page loaded have nothing more to report.
      return !ids.every((id) => TERMINAL.has((jobs.find((j) => j.id === id) || {}).status));
    }, 3000);
  }
  restart();
  return () => { stop(); if (chart) chart.destroy(); };
}
