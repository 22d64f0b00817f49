// Schedules: next fire times in the zone and in UTC, fire history, pause/resume, fire now.
import { useState } from "preact/hooks";
import { api, get, query } from "./api";
import { shortId } from "./format";
import { ErrorNote, Link, useData, useNames } from "./ui";

type Schedule = {
  id: string;
  workflow_id: string;
  cron: string;
  timezone: string;
  enabled: boolean;
  overlap: string;
  next_fire_at: string | null;
  last_fired_at: string | null;
};
type Fire = {
  fire_at: string | null;
  outcome: string;
  reason: string | null;
  run_id: string | null;
  manual: boolean;
  missed_count: number;
  recorded_at: string;
};

export function SchedulesPage({ project }: { project: string }) {
  const list = useData(() => get<{ items: Schedule[] }>(`/schedules${query({ project_id: project, limit: 200 })}`), [project]);
  const names = useNames("/workflows", project);
  return (
    <section>
      <h1>Schedules</h1>
      <ErrorNote error={list.error} />
      {list.data?.items.length === 0 && <p class="muted">No schedules in this project.</p>}
      {list.data?.items.map((s) => (
        <ScheduleCard project={project} schedule={s} workflow={names.get(s.workflow_id)} onChange={list.reload} />
      ))}
    </section>
  );
}

function ScheduleCard(props: { project: string; schedule: Schedule; workflow?: string; onChange: () => void }) {
  const s = props.schedule;
  const next = useData(() => get<{ items: { at: string; local: string }[] }>(`/schedules/${s.id}/next?count=5`), [s.id, s.cron, s.timezone, s.enabled]);
  const fires = useData(() => get<{ items: Fire[] }>(`/schedules/${s.id}/fires?limit=20`), [s.id], 5000);
  const [error, setError] = useState<unknown>(null);
  const act = async (what: () => Promise<unknown>) => {
    setError(null);
    try {
      await what();
      props.onChange();
      fires.reload();
    } catch (e) {
      setError(e);
    }
  };
  return (
    <article class="card" data-schedule={s.id}>
      <header>
        <h2>
          <code>{s.cron}</code> <span class="muted">{s.timezone}</span>
        </h2>
        <span class={s.enabled ? "status status-running" : "status status-paused"}>{s.enabled ? "enabled" : "paused"}</span>
        <span class="spacer" />
        <button class="quiet" onClick={() => act(() => api("PATCH", `/schedules/${s.id}`, { enabled: !s.enabled }))}>
          {s.enabled ? "Pause" : "Resume"}
        </button>
        <button onClick={() => act(() => api("POST", `/schedules/${s.id}/trigger`, {}))}>Trigger now</button>
      </header>
      <ErrorNote error={error} />
      <p>
        Runs{" "}
        <Link href={`/console/p/${props.project}/workflows/${s.workflow_id}`}>{props.workflow ?? shortId(s.workflow_id)}</Link>
        {" · "}overlap {s.overlap}
        {" · "}
        <Link href={`/console/p/${props.project}/runs?schedule_id=${s.id}`}>its runs</Link>
      </p>
      <div class="columns">
        <div>
          <h3>Next fire times</h3>
          {s.enabled ? (
            <table class="next">
              <thead>
                <tr>
                  <th>{s.timezone}</th>
                  <th>UTC</th>
                </tr>
              </thead>
              <tbody>
                {next.data?.items.map((n) => (
                  <tr>
                    <td class="mono">{n.local}</td>
                    <td class="mono">{n.at}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          ) : (
            <p class="muted">Paused: it does not fire.</p>
          )}
        </div>
        <div>
          <h3>Fire history</h3>
          {fires.data?.items.length === 0 && <p class="muted">Not fired yet.</p>}
          <table class="fires">
            <tbody>
              {fires.data?.items.map((f) => (
                <tr data-outcome={f.outcome}>
                  <td class="mono">{f.fire_at ?? f.recorded_at}</td>
                  <td>
                    <span class={`status status-${f.outcome === "started" ? "succeeded" : f.outcome === "skipped" ? "skipped" : "failed"}`}>
                      {f.outcome}
                    </span>
                    {f.manual && <span class="muted"> manual</span>}
                  </td>
                  <td>
                    {f.run_id ? <Link href={`/console/runs/${f.run_id}`}>{shortId(f.run_id)}</Link> : (f.reason ?? "")}
                    {f.missed_count > 0 && <span class="muted"> ({f.missed_count} missed)</span>}
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </div>
      </div>
    </article>
  );
}
