// How values read on the page.

export function shortId(id: string): string {
  return id.slice(-8);
}

export function time(iso: string | null | undefined): string {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

export function duration(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return "—";
  if (ms < 1000) return `${ms} ms`;
  if (ms < 60_000) return `${(ms / 1000).toFixed(ms < 10_000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60_000);
  const s = Math.round((ms % 60_000) / 1000);
  if (m < 60) return `${m} min ${s} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

/** Money arrives as decimal strings; shown with the precision that matters. */
export function usd(value: string | null | undefined): string {
  if (value === null || value === undefined) return "unpriced";
  const n = Number(value);
  if (n === 0) return "$0";
  if (Math.abs(n) < 0.01) return `$${n.toFixed(6)}`;
  return `$${n.toFixed(n < 100 ? 4 : 2)}`;
}

export function count(n: number | null | undefined): string {
  return n === null || n === undefined ? "—" : n.toLocaleString();
}

export function json(value: unknown): string {
  return value === undefined ? "" : JSON.stringify(value, null, 2);
}

/** Where a run came from. */
export function origin(run: { retry_of?: string | null; schedule_id?: string | null; trigger_id?: string | null }): string {
  if (run.retry_of) return "retry";
  if (run.schedule_id) return "schedule";
  if (run.trigger_id) return "trigger";
  return "api";
}
