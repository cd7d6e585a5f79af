// The console's only way to the server: its public HTTP API, on the page's own origin.
// The API key lives in sessionStorage (never in a URL) and goes in the X-API-Key header.

const KEY = "tuneforge.api_key";

export function apiKey() { return sessionStorage.getItem(KEY); }
export function setKey(key) { sessionStorage.setItem(KEY, key); }
export function clearKey() { sessionStorage.removeItem(KEY); }

export class ApiError extends Error {
  constructor(status, body) {
    const detail = body && (body.detail || (body.error && body.error.message));
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  const key = apiKey();
  if (key) h["X-API-Key"] = key;
  return h;
}

export async function request(method, path, body, opts = {}) {
  const init = { method, headers: headers(opts.headers), signal: opts.signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, init);
  if (opts.raw) {
    if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
    return res;
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = { detail: text }; }
  if (res.status === 401 && !opts.noAuthRedirect) {
    clearKey();
    location.hash = "#/login";
  }
  if (!res.ok) throw new ApiError(res.status, data);
  return data;
}

export const get = (path, opts) => request("GET", path, undefined, opts);
export const post = (path, body, opts) => request("POST", path, body ?? {}, opts);
export const del = (path, opts) => request("DELETE", path, undefined, opts);

// A Server-Sent Events stream read with fetch (EventSource cannot send the key header).
// On a dropped connection it reconnects with Last-Event-ID, so the server replays what the
// page missed. `onEvent({id, event, data})`; returns a stop function.
export function stream(path, onEvent, { onState } = {}) {
  let lastId = null, stopped = false, controller = null, retry = 2000;
  async function connect() {
    while (!stopped) {
      controller = new AbortController();
      try {
        const h = headers({ Accept: "text/event-stream" });
        if (lastId !== null) h["Last-Event-ID"] = lastId;
        const res = await fetch(path, { headers: h, signal: controller.signal });
        if (!res.ok) throw new ApiError(res.status, await res.json().catch(() => null));
        onState && onState("live");
        const reader = res.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
            const ev = { id: null, event: "message", data: "" };
            const data = [];
            for (const line of block.split(/\r?\n/)) {
              if (!line || line.startsWith(":")) continue;
              const i = line.indexOf(":");
              const field = i < 0 ? line : line.slice(0, i);
              const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (field === "id") ev.id = val;
              else if (field === "event") ev.event = val;
              else if (field === "data") data.push(val);
              else if (field === "retry" && /^\d+$/.test(val)) retry = Number(val);
            }
            if (!data.length && ev.id === null) continue;
            ev.data = data.join("\n");
            if (ev.id !== null) lastId = ev.id;
            onEvent(ev);
          }
        }
      } catch (e) {
        if (stopped) return;
        if (e instanceof ApiError && e.status >= 400 && e.status < 500) {
          onState && onState(`error: ${e.message}`);
          return;
        }
      }
      if (stopped) return;
      onState && onState("reconnecting");
      await new Promise((r) => setTimeout(r, retry));
    }
  }
  connect();
  return () => { stopped = true; controller && controller.abort(); };
}

// Download a response body as a file (auth by header, so no plain link can do it).
export async function download(path, filename) {
  const res = await request("GET", path, undefined, { raw: true });
  const blob = await res.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
