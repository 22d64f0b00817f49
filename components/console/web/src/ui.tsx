// Small pieces every page uses.
import type { ComponentChildren } from "preact";
import { useCallback, useEffect, useMemo, useRef, useState } from "preact/hooks";
import { ApiError, get, query } from "./api";
import { shortId } from "./format";
import { inApp, navigate } from "./router";

export function Link(props: { href: string; children: ComponentChildren; class?: string; title?: string }) {
  return (
    <a
      href={props.href}
      class={props.class}
      title={props.title}
      onClick={(e) => {
        if (!inApp(e)) return;
        e.preventDefault();
        navigate(props.href);
      }}
    >
      {props.children}
    </a>
  );
}

export function Status({ status }: { status: string }) {
  return (
    <span class={`status status-${status}`} data-status={status}>
      {status.replace("_", " ")}
    </span>
  );
}

export function ErrorNote({ error }: { error: unknown }) {
  if (!error) return null;
  const text =
    error instanceof ApiError
      ? `${error.problem?.title ?? "Error"}${error.problem?.detail ? `: ${error.problem.detail}` : ""}`
      : String(error);
  return (
    <p class="error" role="alert">
      {text}
    </p>
  );
}

export function NotFound({ what }: { what: string }) {
  return (
    <section class="empty" role="alert">
      <h1>{what} not found</h1>
      <p>It does not exist, or it belongs to a project you are not a member of.</p>
      <Link href="/console/">Back to your projects</Link>
    </section>
  );
}

/**
 * Loads with `load` whenever `deps` change, and again every `refreshMs` while the page is
 * visible (when given). `reload` loads now.
 */
export function useData<T>(
  load: () => Promise<T>,
  deps: unknown[],
  refreshMs?: number,
): { data: T | undefined; error: unknown; reload: () => void; loading: boolean } {
  const [data, setData] = useState<T | undefined>(undefined);
  const [error, setError] = useState<unknown>(null);
  const [loading, setLoading] = useState(true);
  const generation = useRef(0);
  const reload = useCallback(() => {
    const mine = ++generation.current;
    load().then(
      (d) => {
        if (mine !== generation.current) return;
        setData(d);
        setError(null);
        setLoading(false);
      },
      (e) => {
        if (mine !== generation.current) return;
        setError(e);
        setLoading(false);
      },
    );
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);
  useEffect(() => {
    setLoading(true);
    setData(undefined);
    reload();
    if (!refreshMs) return;
    const timer = setInterval(() => {
      if (document.visibilityState === "visible") reload();
    }, refreshMs);
    return () => clearInterval(timer);
  }, [reload]);
  return { data, error, reload, loading };
}

export function Json({ value }: { value: unknown }) {
  if (value === null || value === undefined) return <span class="muted">none</span>;
  return <pre class="json">{JSON.stringify(value, null, 2)}</pre>;
}

type Named = { id: string; name?: string; cron?: string };

/** The names of a project's workflows or schedules (by id), for filters and labels; a
 * schedule, which has no name, goes by its cron. */
export function useNames(path: "/workflows" | "/schedules", project: string): Map<string, string> {
  const names = useData(() => get<{ items: Named[] }>(`${path}${query({ project_id: project, limit: 200 })}`), [path, project]);
  return useMemo(
    () => new Map((names.data?.items ?? []).map((w) => [w.id, w.name ?? `${w.cron ?? ""} · ${shortId(w.id)}`])),
    [names.data],
  );
}
