// The run console: a single page over the public API, served by the `console` component.
import "./style.css";
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { ApiError, get, hasSession, onSignedOut, signIn, signOut } from "./api";
import { match, navigate, useLocation } from "./router";
import { Link, NotFound, useData } from "./ui";
import { RunPage, RunsPage } from "./runs";
import { SchedulesPage } from "./schedules";
import { UsagePage } from "./usage";
import { ResourcePage, ResourcesPage } from "./resources";

type Project = { id: string; name: string; slug: string };

function Login({ next }: { next: string }) {
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  return (
    <main class="login">
      <form
        onSubmit={async (e) => {
          e.preventDefault();
          const form = new FormData(e.currentTarget as HTMLFormElement);
          setBusy(true);
          setError(null);
          try {
            await signIn(String(form.get("email")), String(form.get("password")));
            navigate(next.startsWith("/console") ? next : "/console/", true);
          } catch (err) {
            setError(err instanceof ApiError && err.status === 401 ? "Wrong email or password." : String(err));
          } finally {
            setBusy(false);
          }
        }}
      >
        <h1>Spark-Ops console</h1>
        <label>
          Email
          <input name="email" type="email" autocomplete="username" required autofocus />
        </label>
        <label>
          Password
          <input name="password" type="password" autocomplete="current-password" required />
        </label>
        {error && (
          <p class="error" role="alert">
            {error}
          </p>
        )}
        <button type="submit" disabled={busy}>
          Sign in
        </button>
      </form>
    </main>
  );
}

const SECTIONS: [string, string][] = [
  ["runs", "Runs"],
  ["schedules", "Schedules"],
  ["usage", "Usage"],
  ["resources", "Resources"],
];

function Shell({ project, section, children }: { project?: string; section?: string; children?: any }) {
  const projects = useData(() => get<{ items: Project[] }>("/projects?limit=200"), []);
  const [theme, setTheme] = useState(() => localStorage.getItem("sparkops.theme") ?? "system");
  useEffect(() => {
    document.documentElement.dataset.theme = theme;
    localStorage.setItem("sparkops.theme", theme);
  }, [theme]);
  return (
    <div class="shell">
      <header>
        <Link href="/console/" class="brand">
          Spark-Ops
        </Link>
        {project && (
          <nav aria-label="Sections">
            {SECTIONS.map(([key, label]) => (
              <Link href={`/console/p/${project}/${key}`} class={section === key ? "active" : ""}>
                {label}
              </Link>
            ))}
          </nav>
        )}
        <span class="spacer" />
        {projects.data && (
          <label class="project-picker">
            <span class="sr-only">Project</span>
            <select
              value={project ?? ""}
              onChange={(e) => navigate(`/console/p/${(e.currentTarget as HTMLSelectElement).value}/${section ?? "runs"}`)}
            >
              {!project && <option value="">Choose a project</option>}
              {projects.data.items.map((p) => (
                <option value={p.id}>{p.name}</option>
              ))}
            </select>
          </label>
        )}
        <select
          aria-label="Theme"
          value={theme}
          onChange={(e) => setTheme((e.currentTarget as HTMLSelectElement).value)}
        >
          <option value="system">System theme</option>
          <option value="light">Light</option>
          <option value="dark">Dark</option>
        </select>
        <button
          class="quiet"
          onClick={async () => {
            await signOut();
            navigate("/console/login", true);
          }}
        >
          Sign out
        </button>
      </header>
      <main>{children}</main>
    </div>
  );
}

/** `/console/`: the first project's runs, or how to make one. */
function Home() {
  const projects = useData(() => get<{ items: Project[] }>("/projects?limit=200"), []);
  useEffect(() => {
    const first = projects.data?.items[0];
    if (first) navigate(`/console/p/${first.id}/runs`, true);
  }, [projects.data]);
  if (projects.data && projects.data.items.length === 0) {
    return (
      <Shell>
        <section class="empty">
          <h1>No projects yet</h1>
          <p>
            Create one with <code>POST /api/v1/projects</code> (see <a href="/docs">the API docs</a>), then
            come back.
          </p>
        </section>
      </Shell>
    );
  }
  return <Shell>{projects.error ? <NotFound what="Project" /> : <p class="muted">Loading…</p>}</Shell>;
}

function App() {
  const { path, params } = useLocation();
  const [, setSignedOut] = useState(0);
  useEffect(
    () =>
      onSignedOut(() => {
        setSignedOut((n) => n + 1);
        if (location.pathname !== "/console/login") {
          navigate(`/console/login?next=${encodeURIComponent(location.pathname + location.search)}`, true);
        }
      }),
    [],
  );
  if (path === "/console/login") return <Login next={params.get("next") ?? "/console/"} />;
  if (!hasSession()) {
    const next = path + location.search;
    history.replaceState(null, "", `/console/login?next=${encodeURIComponent(next)}`);
    return <Login next={next} />;
  }
  let m;
  if ((m = match("/console/runs/:id", path))) return <RunPage id={m.id} shell={Shell} />;
  if ((m = match("/console/p/:project/:section", path))) {
    const page = {
      runs: () => <RunsPage project={m!.project} params={params} />,
      schedules: () => <SchedulesPage project={m!.project} />,
      usage: () => <UsagePage project={m!.project} />,
      resources: () => <ResourcesPage project={m!.project} />,
    }[m.section];
    return (
      <Shell project={m.project} section={m.section}>
        {page ? page() : <NotFound what="Page" />}
      </Shell>
    );
  }
  if ((m = match("/console/p/:project/:kind/:id", path))) {
    return (
      <Shell project={m.project} section="resources">
        <ResourcePage project={m.project} kind={m.kind} id={m.id} />
      </Shell>
    );
  }
  if (path === "/console" || path === "/console/") return <Home />;
  return (
    <Shell>
      <NotFound what="Page" />
    </Shell>
  );
}

render(<App />, document.getElementById("app")!);
