// The runs list and one run: its graph, timeline, steps, events and actions.
import type { ComponentChildren, FunctionComponent } from "preact";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { api, ApiError, FINAL, follow, get, query, type RunEvent } from "./api";
import { count, duration, origin, shortId, time, usd } from "./format";
import { Dag, Timeline, type StepDef, type StepRow } from "./graph";
import { navigate } from "./router";
import { ErrorNote, Json, Link, NotFound, Status, useData, useNames } from "./ui";

type Run = {
  id: string;
  project_id: string;
  workflow_id: string;
  workflow_version: number;
  status: string;
  input: unknown;
  output: unknown;
  error: { kind?: string; message?: string } | null;
  retry_of: string | null;
  schedule_id: string | null;
  trigger_id: string | null;
  tokens_in: number;
  tokens_out: number;
  cost_usd: string;
  max_cost_usd?: string | null;
  unpriced_calls: number;
  started_at: string | null;
  finished_at: string | null;
  duration_ms: number | null;
  created_at: string;
  steps: Record<string, number>;
};

type Step = StepRow & {
  input: unknown;
  output: unknown;
  error: { kind?: string; message?: string } | null;
  tokens_in: number;
  tokens_out: number;
  cost_usd: string | null;
  duration_ms: number | null;
  next_attempt_at: string | null;
};

const STATUSES = ["queued", "running", "waiting", "paused", "cancelling", "succeeded", "failed", "timed_out", "cancelled"];

export function RunsPage({ project, params }: { project: string; params: URLSearchParams }) {
  const filters = {
    status: params.get("status") ?? "",
    workflow_id: params.get("workflow_id") ?? "",
    schedule_id: params.get("schedule_id") ?? "",
    created_after: params.get("created_after") ?? "",
    created_before: params.get("created_before") ?? "",
  };
  const cursor = params.get("cursor") ?? "";
  const limit = params.get("limit") ?? "50";
  const key = JSON.stringify([project, filters, cursor, limit]);
  // Live: the page reloads itself every 2 s while visible.
  const runs = useData(
    () => get<{ items: Run[]; next_cursor: string | null }>(`/runs${query({ project_id: project, ...filters, cursor, limit })}`),
    [key],
    2000,
  );
  const workflows = useNames("/workflows", project);
  const schedules = useNames("/schedules", project);
  const table = useRef<HTMLTableSectionElement>(null);

  const go = (change: Record<string, string>) => {
    const next = new URLSearchParams(params);
    for (const [k, v] of Object.entries(change)) {
      if (v) next.set(k, v);
      else next.delete(k);
    }
    if (!("cursor" in change)) next.delete("cursor");
    const q = next.toString();
    navigate(`/console/p/${project}/runs${q ? `?${q}` : ""}`);
  };
  const toIso = (local: string) => (local ? new Date(local).toISOString() : "");
  const toLocal = (iso: string) => {
    if (!iso) return "";
    const d = new Date(iso);
    return new Date(d.getTime() - d.getTimezoneOffset() * 60_000).toISOString().slice(0, 16);
  };

  return (
    <section>
      <h1>Runs</h1>
      <form class="filters" onSubmit={(e) => e.preventDefault()} aria-label="Filters">
        <Choice label="Status" value={filters.status} options={STATUSES.map((s) => [s, s])} onPick={(status) => go({ status })} />
        <Choice label="Workflow" value={filters.workflow_id} options={[...workflows]} onPick={(workflow_id) => go({ workflow_id })} />
        <Choice label="Schedule" value={filters.schedule_id} options={[...schedules]} onPick={(schedule_id) => go({ schedule_id })} />
        <label>
          From
          <input
            type="datetime-local"
            value={toLocal(filters.created_after)}
            onChange={(e) => go({ created_after: toIso((e.currentTarget as HTMLInputElement).value) })}
          />
        </label>
        <label>
          To
          <input
            type="datetime-local"
            value={toLocal(filters.created_before)}
            onChange={(e) => go({ created_before: toIso((e.currentTarget as HTMLInputElement).value) })}
          />
        </label>
      </form>
      <ErrorNote error={runs.error} />
      <table class="runs">
        <thead>
          <tr>
            <th>Run</th>
            <th>Status</th>
            <th>Workflow</th>
            <th>Trigger</th>
            <th>Started</th>
            <th class="num">Duration</th>
            <th class="num">Tokens</th>
            <th class="num">Cost</th>
          </tr>
        </thead>
        <tbody
          ref={table}
          onKeyDown={(e) => {
            // j / k move between rows, Enter (on the focused link) opens one.
            const links = [...(table.current?.querySelectorAll<HTMLAnchorElement>("a.run-link") ?? [])];
            const at = links.indexOf(document.activeElement as HTMLAnchorElement);
            if (e.key === "j" || e.key === "ArrowDown") links[Math.min(at + 1, links.length - 1)]?.focus();
            else if (e.key === "k" || e.key === "ArrowUp") links[Math.max(at - 1, 0)]?.focus();
            else return;
            e.preventDefault();
          }}
        >
          {runs.data?.items.map((r) => (
            <tr data-run={r.id} data-status={r.status}>
              <td>
                <Link href={`/console/runs/${r.id}`} class="run-link mono" title={r.id}>
                  {shortId(r.id)}
                </Link>
              </td>
              <td>
                <Status status={r.status} />
              </td>
              <td>{workflows.get(r.workflow_id) ?? shortId(r.workflow_id)}</td>
              <td>{origin(r)}</td>
              <td>{time(r.started_at ?? r.created_at)}</td>
              <td class="num">{duration(r.duration_ms)}</td>
              <td class="num">{count(r.tokens_in + r.tokens_out)}</td>
              <td class="num">{usd(r.cost_usd)}</td>
            </tr>
          ))}
        </tbody>
      </table>
      {runs.data && runs.data.items.length === 0 && <p class="muted">No runs match.</p>}
      <nav class="pager" aria-label="Pages">
        {cursor && (
          <button class="quiet" onClick={() => go({ cursor: "" })}>
            ← Newest
          </button>
        )}
        {runs.data?.next_cursor && (
          <button class="quiet" onClick={() => go({ cursor: runs.data!.next_cursor! })}>
            Older →
          </button>
        )}
      </nav>
    </section>
  );
}

/** A filter: one of `options` (`[value, label]`), or any. */
function Choice(props: { label: string; value: string; options: [string, string][]; onPick: (value: string) => void }) {
  return (
    <label>
      {props.label}
      <select value={props.value} onChange={(e) => props.onPick((e.currentTarget as HTMLSelectElement).value)}>
        <option value="">any</option>
        {props.options.map(([value, label]) => (
          <option value={value}>{label}</option>
        ))}
      </select>
    </label>
  );
}

/** One labelled fact of a run or a step. */
function Fact(props: { label: string; children: ComponentChildren; "data-testid"?: string }) {
  return (
    <div>
      <dt>{props.label}</dt>
      <dd data-testid={props["data-testid"]}>{props.children}</dd>
    </div>
  );
}

type Shell = FunctionComponent<{ project?: string; section?: string }>;

export function RunPage({ id, shell: Shell }: { id: string; shell: Shell }) {
  const [run, setRun] = useState<Run | null>(null);
  const [steps, setSteps] = useState<Step[]>([]);
  const [events, setEvents] = useState<RunEvent[]>([]);
  // `undefined` until the pinned definition has been read, `null` when it cannot be.
  const [definition, setDefinition] = useState<StepDef[] | null | undefined>(undefined);
  const [workflowName, setWorkflowName] = useState<string | null>(null);
  const [missing, setMissing] = useState(false);
  const [error, setError] = useState<unknown>(null);
  const [stream, setStream] = useState<"live" | "reconnecting" | "ended" | "">("");
  const [selected, setSelected] = useState<string | null>(null);
  const refresh = useRef<() => void>(() => undefined);

  useEffect(() => {
    let gone = false;
    let timer: ReturnType<typeof setTimeout> | undefined;
    setRun(null);
    setSteps([]);
    setEvents([]);
    setDefinition(undefined);
    setMissing(false);
    const load = async () => {
      try {
        const [r, s] = await Promise.all([get<Run>(`/runs/${id}`), get<{ items: Step[] }>(`/runs/${id}/steps`)]);
        if (gone) return;
        setRun(r);
        setSteps(s.items);
        setError(null);
        return r;
      } catch (e) {
        if (gone) return;
        if (e instanceof ApiError && (e.status === 404 || e.status === 422)) setMissing(true);
        else setError(e);
      }
    };
    // Events arrive in bursts: at most one reload of the run and its steps in flight, and
    // one more after it when events came meanwhile.
    let loading = false;
    let again = false;
    const reload = async () => {
      if (loading) {
        again = true;
        return;
      }
      loading = true;
      await load();
      loading = false;
      if (again && !gone) {
        again = false;
        refresh.current();
      }
    };
    refresh.current = () => {
      timer ??= setTimeout(() => {
        timer = undefined;
        reload();
      }, 150);
    };
    // Events are appended in batches (one render per batch, not per event).
    let batch: RunEvent[] = [];
    let flush: ReturnType<typeof setTimeout> | undefined;
    let stop = () => {};
    (async () => {
      const r = await load();
      if (!r || gone) return;
      get<{ items: { version: number; definition: { steps: StepDef[] } }[] }>(`/workflows/${r.workflow_id}/versions?limit=200`)
        .then((v) => {
          const pinned = v.items.find((x) => x.version === r.workflow_version);
          if (!gone) setDefinition(pinned?.definition.steps ?? null);
        })
        .catch(() => !gone && setDefinition(null));
      get<{ name: string }>(`/workflows/${r.workflow_id}`)
        .then((w) => !gone && setWorkflowName(w.name))
        .catch(() => undefined);
      stop = follow(
        id,
        0,
        (e) => {
          batch.push(e);
          flush ??= setTimeout(() => {
            flush = undefined;
            const arrived = batch;
            batch = [];
            setEvents((all) => all.concat(arrived));
            refresh.current();
          }, 100);
        },
        (state) => {
          setStream(state);
          if (state === "ended") refresh.current();
        },
      );
    })();
    return () => {
      gone = true;
      clearTimeout(timer);
      clearTimeout(flush);
      stop();
    };
  }, [id]);

  // Each part re-renders only when what it shows changed: a run of 200 steps gets
  // hundreds of events.
  const byKey = useMemo(() => new Map(steps.map((s) => [s.key, s])), [steps]);
  // The pinned definition when readable; otherwise the steps as recorded, unconnected.
  const defs = useMemo<StepDef[]>(
    () => definition ?? steps.map((s) => ({ key: s.key, kind: s.kind })),
    [definition, definition ? null : steps],
  );
  const order = useMemo(() => defs.map((d) => d.key), [defs]);
  const dag = useMemo(
    // Laid out once, when the definition is known (a layout of 200 steps is not free).
    () =>
      definition === undefined ? (
        <p class="muted">Loading the graph…</p>
      ) : (
        <Dag steps={defs} status={byKey} selected={selected} onSelect={setSelected} />
      ),
    [definition === undefined, defs, byKey, selected],
  );
  const stepTable = useMemo(() => {
    // In the definition's order (the API lists them as they were created).
    const at = new Map(order.map((k, i) => [k, i]));
    const sorted = [...steps].sort((a, b) => (at.get(a.key) ?? 1e9) - (at.get(b.key) ?? 1e9));
    return <StepTable steps={sorted} selected={selected} onSelect={setSelected} />;
  }, [steps, order, selected]);
  const eventLog = useMemo(() => <EventLog events={events} />, [events]);

  if (missing)
    return (
      <Shell>
        <NotFound what="Run" />
      </Shell>
    );
  if (!run)
    return (
      <Shell>
        <ErrorNote error={error} />
        <p class="muted">Loading…</p>
      </Shell>
    );

  const current = selected ? byKey.get(selected) : undefined;
  const finished = FINAL.has(run.status);

  return (
    <Shell project={run.project_id} section="runs">
      <section class="run" data-run={run.id}>
        <header class="run-head">
          <h1>
            Run <span class="mono">{shortId(run.id)}</span> <Status status={run.status} />
          </h1>
          <span class={`live live-${stream}`} aria-live="polite">
            {stream === "live" ? "● live" : stream === "reconnecting" ? "reconnecting…" : ""}
          </span>
          <Actions run={run} steps={steps} onChange={() => refresh.current()} />
        </header>
        <dl class="facts">
          <Fact label="Workflow">
            <Link href={`/console/p/${run.project_id}/workflows/${run.workflow_id}`}>{workflowName ?? shortId(run.workflow_id)}</Link> v
            {run.workflow_version}
          </Fact>
          <Fact label="Trigger">
            {origin(run)}
            {run.retry_of && (
              <>
                {" of "}
                <Link href={`/console/runs/${run.retry_of}`}>{shortId(run.retry_of)}</Link>
              </>
            )}
          </Fact>
          <Fact label="Started">{time(run.started_at)}</Fact>
          <Fact label="Duration">{duration(run.duration_ms)}</Fact>
          <Fact label="Tokens">{count(run.tokens_in)} in / {count(run.tokens_out)} out</Fact>
          <Fact label="Cost" data-testid="run-cost">
            {usd(run.cost_usd)}
            {run.unpriced_calls > 0 && ` + ${run.unpriced_calls} unpriced`}
            {run.max_cost_usd && <span class="muted"> of {usd(run.max_cost_usd)} allowed</span>}
          </Fact>
        </dl>
        {run.error && (
          <p class="error" role="alert" data-testid="run-error">
            {run.error.kind}: {run.error.message}
          </p>
        )}
        <h2>Graph</h2>
        {dag}
        <h2>Timeline</h2>
        <Timeline events={events} order={order} ended={finished} />
        {current && <StepPanel run={run} step={current} events={events} onChange={() => refresh.current()} />}
        <h2>Steps</h2>
        {stepTable}
        <h2>Events</h2>
        {eventLog}
      </section>
    </Shell>
  );
}

function StepTable(props: { steps: Step[]; selected: string | null; onSelect: (key: string) => void }) {
  return (
    <table class="steps">
      <thead>
        <tr>
          <th>Step</th>
          <th>Kind</th>
          <th>Status</th>
          <th class="num">Attempts</th>
          <th class="num">Duration</th>
          <th class="num">Tokens</th>
          <th class="num">Cost</th>
        </tr>
      </thead>
      <tbody>
        {props.steps.map((s) => (
          <tr data-step={s.key} class={props.selected === s.key ? "selected" : ""}>
            <td>
              <button class="link" onClick={() => props.onSelect(s.key)}>
                {s.key}
              </button>
            </td>
            <td>{s.kind}</td>
            <td>
              <Status status={s.status} />
            </td>
            <td class="num">{s.attempt}</td>
            <td class="num">{duration(s.duration_ms)}</td>
            <td class="num">{count(s.tokens_in + s.tokens_out)}</td>
            <td class="num">{s.kind === "agent" ? usd(s.cost_usd) : "—"}</td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

/** The newest events (a long run's whole log would be thousands of rows). */
const LOG_ROWS = 300;

function EventLog({ events }: { events: RunEvent[] }) {
  const shown = events.slice(-LOG_ROWS);
  return (
    <>
      {events.length > shown.length && (
        <p class="muted">
          The newest {shown.length} of {events.length} events (all of them: <code>GET /api/v1/runs/…/events</code>).
        </p>
      )}
      <ol class="events" aria-label="Event log">
        {shown.map((e) => (
          <li data-kind={e.kind}>
            <span class="mono muted">#{e.seq}</span> <time>{time(e.at)}</time> <strong>{e.kind}</strong>
            {e.step && <span class="mono"> {e.step}</span>}
            {e.data && Object.keys(e.data).length > 0 && <code> {JSON.stringify(e.data)}</code>}
          </li>
        ))}
      </ol>
    </>
  );
}

function Actions({ run, steps, onChange }: { run: Run; steps: Step[]; onChange: () => void }) {
  const [error, setError] = useState<unknown>(null);
  const act = async (what: () => Promise<unknown>) => {
    setError(null);
    try {
      await what();
      onChange();
    } catch (e) {
      setError(e);
    }
  };
  const retry = (from: "failed" | "start") =>
    act(async () => {
      const next = await api<Run>("POST", `/runs/${run.id}/retry`, { from });
      navigate(`/console/runs/${next.id}`);
    });
  const finished = FINAL.has(run.status);
  const anyFailed = steps.some((s) => s.status === "failed" || s.status === "cancelled");
  return (
    <div class="actions">
      {!finished && run.status !== "cancelling" && (
        <button class="danger" onClick={() => act(() => api("PATCH", `/runs/${run.id}/cancel`))}>
          Cancel run
        </button>
      )}
      {run.status === "running" || run.status === "waiting" || run.status === "queued" ? (
        <button class="quiet" onClick={() => act(() => api("POST", `/runs/${run.id}/pause`))}>
          Pause
        </button>
      ) : null}
      {run.status === "paused" && <button onClick={() => act(() => api("POST", `/runs/${run.id}/resume`))}>Resume</button>}
      {finished && run.status !== "succeeded" && anyFailed && (
        <button onClick={() => retry("failed")}>Retry from failed</button>
      )}
      {finished && <button class="quiet" onClick={() => retry("start")}>Retry from start</button>}
      <ErrorNote error={error} />
    </div>
  );
}

function StepPanel(props: { run: Run; step: Step; events: RunEvent[]; onChange: () => void }) {
  const { run, step } = props;
  const [comment, setComment] = useState("");
  const [error, setError] = useState<unknown>(null);
  const calls = props.events.filter(
    (e) => e.step === step.key && (e.kind.startsWith("model.") || e.kind === "tool.called" || e.kind === "policy.violation"),
  );
  const decide = async (approved: boolean) => {
    setError(null);
    try {
      await api("POST", `/runs/${run.id}/steps/${step.key}/approve`, { approved, comment: comment || undefined });
      props.onChange();
    } catch (e) {
      setError(e);
    }
  };
  return (
    <section class="step-panel" aria-label={`Step ${step.key}`} data-step={step.key}>
      <h2>
        Step <span class="mono">{step.key}</span> <Status status={step.status} />
      </h2>
      <dl class="facts">
        <Fact label="Kind">{step.kind}</Fact>
        <Fact label="Attempts">{step.attempt}</Fact>
        <Fact label="Started">{time(step.started_at)}</Fact>
        <Fact label="Duration">{duration(step.duration_ms)}</Fact>
        <Fact label="Tokens">{count(step.tokens_in)} in / {count(step.tokens_out)} out</Fact>
        <Fact label="Cost">{step.kind === "agent" ? usd(step.cost_usd) : "—"}</Fact>
        {step.next_attempt_at && (
          <Fact label="Next attempt">{time(step.next_attempt_at)}</Fact>
        )}
      </dl>
      {step.status === "waiting" && step.kind === "approval" && (
        <form class="approval" onSubmit={(e) => e.preventDefault()}>
          <label>
            Comment
            <textarea value={comment} maxLength={2000} onInput={(e) => setComment((e.currentTarget as HTMLTextAreaElement).value)} />
          </label>
          <button type="button" onClick={() => decide(true)}>
            Approve
          </button>
          <button type="button" class="danger" onClick={() => decide(false)}>
            Reject
          </button>
          <ErrorNote error={error} />
        </form>
      )}
      {step.error && (
        <div class="error" role="alert" data-testid="step-error">
          <strong>{step.error.kind}</strong>: {step.error.message}
        </div>
      )}
      <div class="io">
        <div>
          <h3>Input</h3>
          <Json value={step.input} />
        </div>
        <div>
          <h3>Output</h3>
          <Json value={step.output} />
        </div>
      </div>
      {calls.length > 0 && (
        <>
          <h3>Model and tool calls</h3>
          <table class="calls">
            <tbody>
              {calls.map((c) => (
                <tr>
                  <td>{c.kind}</td>
                  <td>{c.data?.model ?? c.data?.tool ?? ""}</td>
                  <td class="num">{c.data?.duration_ms !== undefined ? duration(c.data.duration_ms) : ""}</td>
                  <td class="num">
                    {c.data?.tokens_in !== undefined ? `${count(c.data.tokens_in)} / ${count(c.data.tokens_out)}` : ""}
                  </td>
                  <td class="num">{c.data?.cost_usd !== undefined ? usd(c.data.cost_usd) : ""}</td>
                  <td>{c.data?.error ?? ""}</td>
                </tr>
              ))}
            </tbody>
          </table>
        </>
      )}
    </section>
  );
}
