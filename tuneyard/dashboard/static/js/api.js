// The public OpenAI-dialect HTTP API, called with the signed-in key. The key lives in sessionStorage (this tab
// only) and travels only in the Authorization header: never in a URL, never in localStorage.
const KEY = "tuneyard.apiKey";
export const BASE = "/v1";

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.param = err.param || null;
    this.code = err.code || null;
  }
}

export const key = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

function url(path, query) {
  const u = new URL(BASE + path, location.origin);
  for (const [k, v] of Object.entries(query || {})) if (v !== undefined && v !== null) u.searchParams.set(k, v);
  return u.pathname + u.search;
}

async function send(method, path, { query, json, form, token } = {}) {
  const headers = { Authorization: `Bearer ${token || key.get()}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const res = await fetch(url(path, query), { method, headers, body, credentials: "omit", cache: "no-store" });
  if (res.status === 401 && !token) window.dispatchEvent(new Event("tuneyard:unauthorized"));
  return res;
}

/** One JSON call; a non-2xx answer is an ApiError with the API's message and param. */
export async function call(method, path, opts) {
  const res = await send(method, path, opts);
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = null; }
  if (!res.ok) throw new ApiError(res.status, body);
  return body;
}

export const get = (path, query) => call("GET", path, { query });
export const post = (path, json) => call("POST", path, { json: json === undefined ? {} : json });

/** Every item of a list endpoint, following `after` while `has_more`. */
export async function listAll(path, query = {}, max = 5000) {
  const out = [];
  let after;
  for (;;) {
    const page = await get(path, { ...query, after });
    out.push(...page.data);
    if (!page.has_more || !page.data.length || out.length >= max) return out;
    after = page.data[page.data.length - 1].id;
  }
}

/** Check a key without keeping it: the cheapest scoped call. */
export async function verify(token) {
  const res = await send("GET", "/fine_tuning/jobs", { query: { limit: 1 }, token });
  if (res.ok) return;
  let body = null;
  try { body = await res.json(); } catch { body = null; }
  throw new ApiError(res.status, body);
}

/** Fetch a binary endpoint with the key and hand it to the browser as a download. */
export async function download(path, filename) {
  const res = await send("GET", path);
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch { body = null; }
    throw new ApiError(res.status, body);
  }
  const blob = await res.blob();
  const href = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = href;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 10000);
}
