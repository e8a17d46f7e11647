// HTTP helpers: JSON calls and Server-Sent Events over a fetch POST (EventSource cannot POST).
// A 401 asks for the API key once (kept in localStorage) and repeats the request; the dialog says "wrong key"
// when the key sent was refused.

const KEY = "infinichat.apiKey";

export class ApiError extends Error {
  constructor(message, status, type) { super(message); this.status = status; this.type = type; }
}

let askKeyHook = async () => null;
export function onAuthNeeded(fn) { askKeyHook = fn; }

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = localStorage.getItem(KEY);
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

/** Headers that carry the API key, for requests made without `api` (images, downloads). */
export function authHeaders() { return headers(false); }

async function errorOf(r) {
  let data = null;
  try { data = await r.json(); } catch { /* not JSON */ }
  const e = data && data.error;
  return new ApiError((e && e.message) || `${r.status} ${r.statusText}`, r.status, e && e.type);
}

async function authed(doFetch) {
  for (let attempt = 0; ; attempt++) {
    const r = await doFetch();
    if (r.status !== 401 || attempt >= 3) return r;
    const key = await askKeyHook(localStorage.getItem(KEY) ? "wrong" : "missing"); // a key was sent: it was wrong
    if (!key) return r;
    localStorage.setItem(KEY, key);
  }
}

/** A JSON request; resolves to the parsed body (null for 204), rejects with ApiError. */
export async function api(method, path, body) {
  const r = await authed(() => fetch(path, {
    method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  }));
  if (!r.ok) throw await errorOf(r);
  if (r.status === 204) return null;
  return r.json();
}

/**
 * POST `body` to `path` and call handlers[event](data) for each SSE event (token, kv, done, error).
 * `signal` aborts the request (the server cancels the generation when the client goes away).
 */
export async function stream(path, body, handlers, signal) {
  const r = await authed(() => fetch(path, {
    method: "POST", headers: { ...headers(true), Accept: "text/event-stream" },
    body: JSON.stringify(body ?? {}), signal,
  }));
  if (!r.ok) throw await errorOf(r);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  const dispatch = (block) => {
    let event = "message";
    const data = [];
    for (const line of block.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    let parsed;
    try { parsed = JSON.parse(data.join("\n")); } catch { parsed = data.join("\n"); }
    const h = handlers[event];
    if (h) h(parsed);
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let m;
    while ((m = /\r?\n\r?\n/.exec(buf))) {
      dispatch(buf.slice(0, m.index));
      buf = buf.slice(m.index + m[0].length);
    }
  }
  buf += decoder.decode();
  if (buf.trim()) dispatch(buf);
}
