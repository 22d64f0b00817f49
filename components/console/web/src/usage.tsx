// Usage: spend and tokens per day (uPlot), per workflow and per model, budgets, and the
// failure rate and p95 duration per step kind.
import "uplot/dist/uPlot.min.css";
import uPlot from "uplot";
import { useEffect, useRef, useState } from "preact/hooks";
import { get, query } from "./api";
import { count, duration, shortId, usd } from "./format";
import { ErrorNote, Link, useData, useNames } from "./ui";

type Group = {
  day?: string;
  workflow_id?: string;
  model?: string;
  kind?: string;
  tool_id?: string | null;
  count: number;
  by_status: Record<string, number>;
  success_rate: number | null;
  duration_ms: { p50: number | null; p95: number | null; p99: number | null };
  tokens_in: number;
  tokens_out: number;
  cost_usd: string;
  unpriced_calls: number;
};
type Budget = {
  policy_id: string;
  name: string;
  budget: { limit_usd: string; window: string; action: string };
  spent_usd: string;
  reserved_usd: string;
  remaining_usd: string;
  exceeded: boolean;
};

const DAYS = [7, 30, 90];

/** A theme colour as the canvas needs it (`rgb(...)`): resolved in the current scheme. */
function color(variable: string): string {
  const probe = document.createElement("span");
  probe.style.color = `var(${variable})`;
  document.body.append(probe);
  const resolved = getComputedStyle(probe).color;
  probe.remove();
  return resolved;
}

/** One point per UTC day of the period, zero where nothing ran. */
function everyDay(items: Group[], days: number): uPlot.AlignedData {
  const byDay = new Map(items.map((g) => [g.day!, g]));
  const today = Date.UTC(new Date().getUTCFullYear(), new Date().getUTCMonth(), new Date().getUTCDate());
  const x: number[] = [];
  const cost: number[] = [];
  const tokens: number[] = [];
  for (let i = days - 1; i >= 0; i--) {
    const t = today - i * 86_400_000;
    const g = byDay.get(new Date(t).toISOString().slice(0, 10));
    x.push(t / 1000);
    cost.push(g ? Number(g.cost_usd) : 0);
    tokens.push(g ? g.tokens_in + g.tokens_out : 0);
  }
  return [x, cost, tokens];
}

function DailyChart({ items, days }: { items: Group[]; days: number }) {
  const box = useRef<HTMLDivElement>(null);
  useEffect(() => {
    if (!box.current) return;
    const data = everyDay(items, days);
    const accent = color("--accent");
    const second = color("--ok");
    const ink = color("--muted");
    const plot = new uPlot(
      {
        width: Math.min(box.current.clientWidth || 800, 1000),
        height: 220,
        series: [
          {},
          { label: "Cost (USD)", stroke: accent, fill: accent.replace("rgb(", "rgba(").replace(")", ", 0.2)"), scale: "usd", paths: uPlot.paths.bars!({ size: [0.6, 40] }) },
          { label: "Tokens", stroke: second, width: 2, scale: "tokens" },
        ],
        axes: [
          { stroke: ink },
          { scale: "usd", stroke: ink, values: (_u, v) => v.map((x) => `$${x}`) },
          { scale: "tokens", side: 1, stroke: ink, grid: { show: false } },
        ],
        scales: { x: { time: true } },
      },
      data,
      box.current,
    );
    return () => plot.destroy();
  }, [items, days]);
  return <div ref={box} class="chart" data-testid="daily-chart" />;
}

/** Horizontal bars of cost, one per group. */
function Bars(props: { items: Group[]; label: (g: Group) => any; testid: string }) {
  const max = Math.max(...props.items.map((g) => Number(g.cost_usd)), 0);
  return (
    <table class="bars" data-testid={props.testid}>
      <thead>
        <tr>
          <th />
          <th class="num">Count</th>
          <th class="num">Tokens</th>
          <th class="num">Cost</th>
          <th class="bar-col" />
        </tr>
      </thead>
      <tbody>
        {props.items.map((g) => (
          <tr>
            <td>{props.label(g)}</td>
            <td class="num">{count(g.count)}</td>
            <td class="num">{count(g.tokens_in + g.tokens_out)}</td>
            <td class="num">{usd(g.cost_usd)}</td>
            <td class="bar-col">
              <span class="hbar" ref={(el) => {
                  if (el) el.style.width = `${max > 0 ? (Number(g.cost_usd) / max) * 100 : 0}%`;
                }} />
            </td>
          </tr>
        ))}
      </tbody>
    </table>
  );
}

export function UsagePage({ project }: { project: string }) {
  const [days, setDays] = useState(30);
  const range = () => {
    const to = new Date(Date.now() + 60_000);
    const from = new Date(to.getTime() - days * 86_400_000);
    return { project_id: project, from: from.toISOString(), to: to.toISOString() };
  };
  const load = (group_by: string) => () => get<{ items: Group[] }>(`/metrics/summary${query({ ...range(), group_by })}`);
  const total = useData(() => get<{ items: Group[] }>(`/metrics/summary${query(range())}`), [project, days], 10_000);
  const daily = useData(load("day"), [project, days], 10_000);
  const perWorkflow = useData(load("workflow"), [project, days], 10_000);
  const perModel = useData(load("model"), [project, days], 10_000);
  const stepKinds = useData(() => get<{ items: Group[] }>(`/metrics/steps${query({ ...range(), by: "kind" })}`), [project, days], 10_000);
  const budgets = useData(() => get<{ items: Budget[] }>(`/policies/usage${query({ project_id: project })}`), [project], 10_000);
  const names = useNames("/workflows", project);
  const all = total.data?.items[0];

  // Failed of those that ended (succeeded, failed or timed out), per kind.
  const kinds = (stepKinds.data?.items ?? []).map((g) => {
    const failed = (g.by_status.failed ?? 0) + (g.by_status.timed_out ?? 0);
    const ended = failed + (g.by_status.succeeded ?? 0);
    return { kind: g.kind!, count: g.count, rate: ended === 0 ? null : failed / ended, p95: g.duration_ms.p95 };
  });

  return (
    <section class="usage">
      <header class="row">
        <h1>Usage</h1>
        <span class="spacer" />
        <label>
          Period
          <select value={days} onChange={(e) => setDays(Number((e.currentTarget as HTMLSelectElement).value))}>
            {DAYS.map((d) => (
              <option value={d}>last {d} days</option>
            ))}
          </select>
        </label>
      </header>
      <ErrorNote error={total.error ?? daily.error ?? budgets.error} />
      <dl class="facts big">
        <div>
          <dt>Runs</dt>
          <dd data-testid="usage-runs">{count(all?.count ?? 0)}</dd>
        </div>
        <div>
          <dt>Spend</dt>
          <dd data-testid="usage-cost">{usd(all?.cost_usd ?? "0")}</dd>
        </div>
        <div>
          <dt>Tokens</dt>
          <dd>{count((all?.tokens_in ?? 0) + (all?.tokens_out ?? 0))}</dd>
        </div>
        <div>
          <dt>Success rate</dt>
          <dd>{all?.success_rate == null ? "—" : `${(all.success_rate * 100).toFixed(1)}%`}</dd>
        </div>
        <div>
          <dt>p95 run duration</dt>
          <dd>{duration(all?.duration_ms.p95)}</dd>
        </div>
      </dl>
      <h2>Per day</h2>
      {daily.data && <DailyChart items={daily.data.items} days={days} />}
      <div class="columns">
        <div>
          <h2>Per workflow</h2>
          {perWorkflow.data && (
            <Bars
              testid="per-workflow"
              items={perWorkflow.data.items}
              label={(g) => (
                <Link href={`/console/p/${project}/workflows/${g.workflow_id}`}>{names.get(g.workflow_id!) ?? shortId(g.workflow_id!)}</Link>
              )}
            />
          )}
        </div>
        <div>
          <h2>Per model</h2>
          {perModel.data && <Bars testid="per-model" items={perModel.data.items} label={(g) => <code>{g.model}</code>} />}
        </div>
      </div>
      <h2>Budgets</h2>
      {budgets.data?.items.length === 0 && <p class="muted">No budgets in this project.</p>}
      <table class="budgets">
        <tbody>
          {budgets.data?.items.map((b) => (
            <tr data-policy={b.policy_id} class={b.exceeded ? "exceeded" : ""}>
              <td>
                <Link href={`/console/p/${project}/policies/${b.policy_id}`}>{b.name}</Link>
              </td>
              <td>
                {usd(b.budget.limit_usd)} per {b.budget.window} ({b.budget.action})
              </td>
              <td class="num">spent {usd(b.spent_usd)}</td>
              <td class="num">reserved {usd(b.reserved_usd)}</td>
              <td class="num">remaining {usd(b.remaining_usd)}</td>
              <td class="bar-col">
                <meter min={0} max={Number(b.budget.limit_usd)} value={Number(b.spent_usd) + Number(b.reserved_usd)} />
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <h2>Steps by kind</h2>
      <table class="kinds">
        <thead>
          <tr>
            <th>Kind</th>
            <th class="num">Steps</th>
            <th class="num">Failure rate</th>
            <th class="num">p95 duration</th>
          </tr>
        </thead>
        <tbody>
          {kinds.map((k) => (
            <tr data-kind={k.kind}>
              <td>{k.kind}</td>
              <td class="num">{count(k.count)}</td>
              <td class="num">{k.rate === null ? "—" : `${(k.rate * 100).toFixed(1)}%`}</td>
              <td class="num">{duration(k.p95)}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
