// The HTTP API as the page speaks it: the API key, JSON calls, and server-sent events read
// from a POST (EventSource can only GET). Every call the page makes goes through here.

const KEY_STORAGE = "sdserve.apiKey";

/** An error answer of the API: OpenAI's {"error": {message, type, param, code}}. */
export class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null; // the body field at fault ("n", "size", ...)
    this.code = error.code || "";
  }
}

/** The key entered in this tab ("" when none); sessionStorage: once per browser tab. */
export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) h["Authorization"] = `Bearer ${key}`;
  return h;
}

async function errorOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // not JSON: keep the status alone
  }
  return new ApiError(response.status, body.error || { message: response.statusText });
}

/** GET or POST `path` with a JSON body; resolves to the parsed JSON, throws ApiError. */
export async function call(path, { method = "GET", body, signal } = {}) {
  const response = await fetch(path, {
    method,
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/**
 * POSTs a streamed generation and calls `onEvent(type, data)` for each server-sent event
 * (type "image_generation.partial_image", "image_generation.progress",
 * "image_generation.completed"; an "error" event throws ApiError). Aborting `signal` closes
 * the connection, which is how the server learns to stop the request's steps.
 */
export async function stream(path, body, onEvent, signal) {
  const response = await fetch(path, {
    method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n"); // sse-starlette ends lines with \r\n
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = parseEvent(block);
      if (!event) continue;
      if (event.type === "error") throw new ApiError(500, event.data.error || event.data);
      onEvent(event.type, event.data);
    }
  }
}

/** One SSE block ("event: x\ndata: {...}") -> {type, data}; null for comments (pings). */
function parseEvent(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":") || !line) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  const parsed = JSON.parse(data.join("\n"));
  return { type: parsed.type && type === "message" ? parsed.type : type, data: parsed };
}

/** A file of the API (a job's image) fetched with the key: its bytes. */
export async function fetchBytes(path) {
  const response = await fetch(path, { headers: headers(false) });
  if (!response.ok) throw await errorOf(response);
  return new Uint8Array(await response.arrayBuffer());
}
