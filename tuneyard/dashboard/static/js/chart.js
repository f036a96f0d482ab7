// Line charts on the vendored uPlot (a classic script: window.uPlot), each with its numbers in a table beside it
// (screen readers, and the tests compare those numbers with the API's).
import { h, clear } from "./dom.js";

function css(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

const fmt = (v) => (v === null || v === undefined ? "" : Number(v).toPrecision(6).replace(/\.?0+$/, ""));

export class Chart {
  /** `title`, the x axis label, and series labels; `update` takes one [[x, y], ...] array per series. */
  constructor(parent, { title, xLabel = "step", labels, id }) {
    this.title = title;
    this.xLabel = xLabel;
    this.labels = labels;
    this.plot = null;
    this.key = "";
    this.box = h("div", { class: "chart", role: "img", "aria-label": `${title} chart` });
    this.empty = h("p", { class: "muted" }, "No data points yet.");
    this.table = h("table", { "data-chart": id || title });
    this.details = h("details", {}, h("summary", {}, `${title}: data points`), this.table);
    this.root = h("figure", { class: "panel", "data-chart-figure": id || title },
      h("figcaption", { class: "sr-only" }, title), this.empty, this.box, this.details);
    parent.append(this.root);
    this.resize = new ResizeObserver(() => {
      if (this.plot) this.plot.setSize({ width: this.width(), height: 220 });
    });
    this.resize.observe(this.root);
    // Axis and grid colours are painted into the canvas: paint again when the colour scheme changes.
    this.scheme = window.matchMedia("(prefers-color-scheme: dark)");
    this.repaint = () => {
      this.key = "";
      if (this.last) this.update(this.last);
    };
    this.scheme.addEventListener("change", this.repaint);
  }

  width() {
    return Math.max(280, this.root.clientWidth - 34);
  }

  update(seriesPoints) {
    this.last = seriesPoints;
    const keep = seriesPoints.map((pts, i) => [this.labels[i], pts]).filter(([, pts]) => pts.length);
    const key = JSON.stringify(keep);
    if (key === this.key) return;
    this.key = key;
    const xs = [...new Set(keep.flatMap(([, pts]) => pts.map((p) => p[0])))].sort((a, b) => a - b);
    const columns = keep.map(([, pts]) => {
      const by = new Map(pts);
      return xs.map((x) => (by.has(x) ? by.get(x) : null));
    });
    this.renderTable(xs, keep.map(([l]) => l), columns);
    this.empty.hidden = xs.length > 0;
    if (this.plot) {
      this.plot.destroy();
      this.plot = null;
    }
    if (!xs.length || !window.uPlot) return;
    const fg = css("--fg"), grid = css("--line");
    const axis = { stroke: fg, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } };
    const opts = {
      title: this.title, width: this.width(), height: 220,
      scales: { x: { time: false } },
      axes: [{ ...axis, label: this.xLabel }, { ...axis, size: 60 }],
      series: [{ label: this.xLabel }, ...keep.map(([label], i) => ({
        label, stroke: css(`--s${(i % 6) + 1}`), width: 2, spanGaps: true, points: { show: xs.length < 40 },
      }))],
    };
    this.plot = new window.uPlot(opts, [xs, ...columns], this.box);
  }

  renderTable(xs, labels, columns) {
    clear(this.table,
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, this.xLabel),
        labels.map((l) => h("th", { scope: "col", class: "num" }, l)))),
      h("tbody", {}, xs.map((x, r) => h("tr", {}, h("th", { scope: "row" }, x),
        columns.map((c) => h("td", { class: "num", "data-value": c[r] ?? "" }, fmt(c[r])))))));
  }

  destroy() {
    this.resize.disconnect();
    this.scheme.removeEventListener("change", this.repaint);
    if (this.plot) this.plot.destroy();
  }
}
