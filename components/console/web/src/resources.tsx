// Read views of a project's agents, tools, workflows (with versions) and policies.
import { get, query } from "./api";
import { time } from "./format";
import { ErrorNote, Json, Link, NotFound, useData } from "./ui";
import { ApiError } from "./api";

const KINDS: [string, string][] = [
  ["workflows", "Workflows"],
  ["agents", "Agents"],
  ["tools", "Tools"],
  ["policies", "Policies"],
];

type Item = { id: string; name: string; version: number; updated_at: string; description?: string | null };

function List({ project, kind, label }: { project: string; kind: string; label: string }) {
  const items = useData(() => get<{ items: Item[] }>(`/${kind}${query({ project_id: project, limit: 200 })}`), [project, kind]);
  return (
    <div class="resource-list" data-kind={kind}>
      <h2>{label}</h2>
      <ErrorNote error={items.error} />
      {items.data?.items.length === 0 && <p class="muted">None yet.</p>}
      <ul>
        {items.data?.items.map((i) => (
          <li>
            <Link href={`/console/p/${project}/${kind}/${i.id}`}>{i.name}</Link>{" "}
            <span class="muted">
              v{i.version} · {time(i.updated_at)}
            </span>
          </li>
        ))}
      </ul>
    </div>
  );
}

export function ResourcesPage({ project }: { project: string }) {
  return (
    <section>
      <h1>Resources</h1>
      <div class="grid">
        {KINDS.map(([kind, label]) => (
          <List project={project} kind={kind} label={label} />
        ))}
      </div>
    </section>
  );
}

export function ResourcePage({ project, kind, id }: { project: string; kind: string; id: string }) {
  const known = KINDS.some(([k]) => k === kind);
  const item = useData(() => (known ? get<Record<string, any>>(`/${kind}/${id}`) : Promise.reject(new ApiError(404, null))), [kind, id]);
  const versions = useData(
    () =>
      kind === "workflows"
        ? get<{ items: { version: number; created_at: string; definition: unknown }[] }>(`/workflows/${id}/versions?limit=200`)
        : Promise.resolve({ items: [] }),
    [kind, id],
  );
  if (item.error instanceof ApiError && (item.error.status === 404 || item.error.status === 422)) return <NotFound what="Resource" />;
  const data = item.data;
  if (!data) return <ErrorNote error={item.error} />;
  const { id: _id, name, version, created_at, updated_at, project_id: _p, ...rest } = data;
  return (
    <section class="resource" data-kind={kind}>
      <h1>
        {name} <span class="muted">v{version}</span>
      </h1>
      <p class="muted">
        {kind.replace(/s$/, "")} · created {time(created_at)} · updated {time(updated_at)}
        {kind === "workflows" && (
          <>
            {" · "}
            <Link href={`/console/p/${project}/runs?workflow_id=${id}`}>its runs</Link>
          </>
        )}
      </p>
      <Json value={rest} />
      {kind === "workflows" && versions.data && versions.data.items.length > 0 && (
        <>
          <h2>Versions</h2>
          {versions.data.items.map((v) => (
            <details>
              <summary>
                v{v.version} · {time(v.created_at)}
              </summary>
              <Json value={v.definition} />
            </details>
          ))}
        </>
      )}
    </section>
  );
}
