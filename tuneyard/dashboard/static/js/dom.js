// Small DOM helpers: elements are built, never parsed from strings, so no markup or inline style reaches the page.

/** h("a", {href: "#"}, "text", child) -> element; `on*` attributes become listeners. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function announce(text) {
  document.getElementById("announce").textContent = text;
}

export function when(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "—";
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function statusBadge(status) {
  return h("span", { class: `status status-${status}` }, status.replace("_", " "));
}

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);

/** Ask with the page's <dialog>; resolves true on Confirm. Focus returns to what had it. */
export function confirmAction(text) {
  const dlg = document.getElementById("confirm");
  const back = document.activeElement;
  document.getElementById("confirm-text").textContent = text;
  dlg.returnValue = "";
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => {
      if (back && back.focus) back.focus();
      resolve(dlg.returnValue === "ok");
    }, { once: true });
    dlg.showModal();
    document.getElementById("confirm-ok").focus();
  });
}

/** "a: b, c: d" for a small object (metadata, integrations). */
export function pairs(obj) {
  if (!obj || !Object.keys(obj).length) return "—";
  return Object.entries(obj).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(", ");
}
