// The public API, as the signed-in user. The access token lives in memory only; the
// refresh token (which the session needs to survive a reload) in sessionStorage, so it
// ends with the tab. Nothing else is stored.

const REFRESH = "sparkops.refresh";
const BASE = "/api/v1";

let access: string | null = null;
let refreshing: Promise<boolean> | null = null;
const signedOutListeners = new Set<() => void>();

/** An answer other than 2xx, with its RFC 9457 problem when the API sent one. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly problem: { title?: string; detail?: string; type?: string } | null,
  ) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
  }
}

export function hasSession(): boolean {
  return access !== null || sessionStorage.getItem(REFRESH) !== null;
}

export function onSignedOut(listener: () => void): () => void {
  signedOutListeners.add(listener);
  return () => signedOutListeners.delete(listener);
}

function keep(tokens: { access_token: string; refresh_token: string }) {
  access = tokens.access_token;
  sessionStorage.setItem(REFRESH, tokens.refresh_token);
}

function forget() {
  access = null;
  sessionStorage.removeItem(REFRESH);
  signedOutListeners.forEach((l) => l());
}

async function problemOf(response: Response): Promise<ApiError> {
  let problem = null;
  try {
    problem = await response.json();
  } catch {
    // not JSON: the status says enough
  }
  return new ApiError(response.status, problem);
}

export async function signIn(email: string, password: string): Promise<void> {
  const response = await fetch(`${BASE}/auth/login`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ email, password }),
  });
  if (!response.ok) throw await problemOf(response);
  keep(await response.json());
}

export async function signOut(): Promise<void> {
  const refresh_token = sessionStorage.getItem(REFRESH);
  if (refresh_token) {
    await fetch(`${BASE}/auth/logout`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ refresh_token }),
    }).catch(() => undefined);
  }
  forget();
}

/** One refresh at a time: concurrent 401s wait for the same new pair. */
function refresh(): Promise<boolean> {
  refreshing ??= (async () => {
    const refresh_token = sessionStorage.getItem(REFRESH);
    if (!refresh_token) return false;
    const response = await fetch(`${BASE}/auth/refresh`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ refresh_token }),
    }).catch(() => null);
    if (!response?.ok) return false;
    keep(await response.json());
    return true;
  })().finally(() => {
    refreshing = null;
  });
  return refreshing;
}

/** Sends with the access token, refreshing it once when it has expired. */
export async function authorized(path: string, init: RequestInit = {}): Promise<Response> {
  if (access === null && !(await refresh())) {
    forget();
    throw new ApiError(401, { title: "Signed out" });
  }
  const send = () =>
    fetch(`${BASE}${path}`, {
      ...init,
      headers: { ...(init.headers as Record<string, string>), authorization: `Bearer ${access}` },
    });
  let response = await send();
  if (response.status === 401) {
    if (!(await refresh())) {
      forget();
      throw new ApiError(401, { title: "Signed out" });
    }
    response = await send();
  }
  return response;
}

export async function api<T = any>(method: string, path: string, body?: unknown): Promise<T> {
  const init: RequestInit = { method };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = { "content-type": "application/json" };
  }
  const response = await authorized(path, init);
  if (!response.ok) throw await problemOf(response);
  return response.status === 204 ? (undefined as T) : response.json();
}

export const get = <T = any>(path: string) => api<T>("GET", path);

/** A query string of the set values. */
export function query(params: Record<string, string | number | null | undefined>): string {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") q.set(k, String(v));
  const s = q.toString();
  return s ? `?${s}` : "";
}

export const FINAL = new Set(["succeeded", "failed", "timed_out", "cancelled"]);

export type RunEvent = { seq: number; kind: string; step: string | null; data: any; at: string };

/**
 * Follows a run's event stream (SSE over fetch, so the token goes in a header), resuming
 * from the last event seen after a disconnect. `onEnd` is told when the server closes the
 * stream because the run is over. Returns a function that stops following.
 */
export function follow(
  runId: string,
  after: number,
  onEvent: (e: RunEvent) => void,
  onState: (state: "live" | "reconnecting" | "ended") => void,
): () => void {
  const stop = new AbortController();
  let last = after;
  (async () => {
    let delay = 500;
    while (!stop.signal.aborted) {
      try {
        const response = await authorized(`/runs/${runId}/events`, {
          headers: { accept: "text/event-stream", "last-event-id": String(last) },
          signal: stop.signal,
        });
        if (!response.ok || !response.body) throw await problemOf(response);
        onState("live");
        delay = 500;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, end);
            buffer = buffer.slice(end + 2);
            const data = block
              .split("\n")
              .filter((l) => l.startsWith("data:"))
              .map((l) => l.slice(5).trimStart())
              .join("\n");
            if (!data) continue;
            const event: RunEvent = JSON.parse(data);
            if (typeof event.seq === "number" && event.seq > last) {
              last = event.seq;
              onEvent(event);
            }
          }
        }
        // The server ends the stream when the run has ended, or after ten minutes.
        const run = await api<{ status: string }>("GET", `/runs/${runId}`);
        if (FINAL.has(run.status)) {
          onState("ended");
          return;
        }
      } catch (e) {
        if (stop.signal.aborted) return;
        if (e instanceof ApiError && e.status !== 503 && e.status !== 429 && e.status < 500) {
          onState("ended");
          return;
        }
        onState("reconnecting");
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 10_000);
      }
    }
  })();
  return () => stop.abort();
}
