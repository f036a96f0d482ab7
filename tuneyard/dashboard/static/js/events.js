// A job's events, fetched incrementally (newest first, as the API lists them) and turned into metric series.
import { get } from "./api.js";

export class EventFeed {
  constructor(jobId) {
    this.jobId = jobId;
    this.events = []; // oldest first
    this.seen = new Set();
  }

  /** Fetch what is new since the last call; returns the new events, oldest first. */
  async refresh() {
    const fresh = [];
    let after;
    for (;;) {
      const page = await get(`/fine_tuning/jobs/${encodeURIComponent(this.jobId)}/events`, { limit: 100, after });
      let known = false;
      for (const e of page.data) {
        if (this.seen.has(e.id)) { known = true; break; }
        fresh.push(e);
      }
      if (known || !page.has_more || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    fresh.reverse();
    for (const e of fresh) this.seen.add(e.id);
    this.events.push(...fresh);
    return fresh;
  }

  /** [[step, value], ...] of one metric from the metrics events, the last report of a step winning. */
  series(name) {
    const by = new Map();
    for (const e of this.events) {
      const d = e.data || {};
      if (e.type === "metrics" && typeof d.step === "number" && typeof d[name] === "number") by.set(d.step, d[name]);
    }
    return [...by.entries()].sort((a, b) => a[0] - b[0]);
  }

  latest(name) {
    for (let i = this.events.length - 1; i >= 0; i--) {
      const d = this.events[i].data || {};
      if (this.events[i].type === "metrics" && typeof d[name] === "number") return d[name];
    }
    return null;
  }
}
