// The run console in a real browser: Playwright (playwright-core from the npm registry)
// driving Debian's Chromium, headless, against the real app that
// tests/host/tests/e2e/console.rs starts with its fakes and passes in CONSOLE_FIXTURE.
// Run by that test; on its own: CONSOLE_URL=... CONSOLE_FIXTURE='{...}' node --test console.test.mjs
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BASE = process.env.CONSOLE_URL;
const FIXTURE = JSON.parse(process.env.CONSOLE_FIXTURE ?? "{}");
const SHOTS = process.env.SCREENSHOTS ?? "screenshots";
const WAIT = 30_000;
mkdirSync(SHOTS, { recursive: true });

let browser;
let context;
let page;
/** Content-Security-Policy violations and uncaught errors seen by any page. */
const problems = [];

async function api(token, method, path, body) {
  const response = await fetch(`${BASE}/api/v1${path}`, {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  assert.ok(response.ok, `${method} ${path}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

async function token(who) {
  const response = await fetch(`${BASE}/api/v1/auth/login`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ email: who.email, password: who.password }),
  });
  assert.equal(response.status, 200);
  return (await response.json()).access_token;
}

async function shot(name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

async function signIn(who) {
  await page.goto(`${BASE}/console/`);
  await page.waitForURL(/\/console\/login/);
  await page.getByLabel("Email").fill(who.email);
  await page.getByLabel("Password").fill(who.password);
  await page.getByRole("button", { name: "Sign in" }).click();
}

async function signOut() {
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.waitForURL(/\/console\/login/);
}

/** A step's node in the run's graph, and the run's status badge (CSS selectors). */
const NODE = (key) => `.dag [data-step="${key}"]`;
const RUN_STATUS = ".run-head h1 .status";
const node = (key) => page.locator(NODE(key));
const runStatus = () => page.locator(RUN_STATUS);

async function openRun(id) {
  await page.goto(`${BASE}/console/runs/${id}`);
  await page.locator(".dag").waitFor({ timeout: WAIT });
  // A marker that a reload would wipe: live updates must keep it.
  await page.evaluate(() => {
    window.__sameDocument = true;
  });
}

/** Waits until the element `selector` says `status` (its data-status). */
async function expectStatus(selector, status) {
  await page.waitForFunction(
    ([selector, want]) => document.querySelector(selector)?.getAttribute("data-status") === want,
    [selector, status],
    { timeout: WAIT },
  );
}

before(async () => {
  assert.ok(BASE, "CONSOLE_URL is set");
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    args: ["--no-sandbox"],
  });
  context = await browser.newContext({ viewport: { width: 1366, height: 800 } });
  page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error" && /Content Security Policy|Refused to/.test(m.text())) problems.push(m.text());
  });
  page.on("pageerror", (e) => problems.push(String(e)));
});

after(async () => {
  await browser?.close();
});

test("sign in lands on the project's runs", async () => {
  await signIn(FIXTURE.owner);
  await page.waitForURL(new RegExp(`/console/p/${FIXTURE.project}/runs`));
  await page.getByRole("heading", { name: "Runs" }).waitFor();
  // The access token is kept in memory; only the refresh token is in session storage.
  const stored = await page.evaluate(() => ({ local: { ...localStorage }, session: Object.keys(sessionStorage) }));
  assert.deepEqual(stored.session, ["sparkops.refresh"]);
  assert.ok(!JSON.stringify(stored.local).includes("ey"), `no token in localStorage: ${JSON.stringify(stored.local)}`);
  await shot("login-then-runs");
});

test("a diamond run with a conditional branch reaches succeeded live, without a reload", async () => {
  const t = await token(FIXTURE.owner);
  const run = await api(t, "POST", "/runs", { workflow_id: FIXTURE.workflows.diamond, input: { deep: false } });
  await openRun(run.id);
  assert.notEqual(await runStatus().getAttribute("data-status"), "succeeded", "the run is still going when the page opens");
  await expectStatus(RUN_STATUS, "succeeded");
  for (const [key, status] of [
    ["plan", "succeeded"],
    ["left", "succeeded"],
    ["right", "skipped"],
    ["join", "succeeded"],
  ]) {
    assert.equal(await node(key).getAttribute("data-status"), status, key);
  }
  assert.equal(await page.evaluate(() => window.__sameDocument), true, "no reload happened");
  // The timeline has one bar per attempt of each step that ran.
  assert.equal(await page.locator('.timeline rect[data-step="plan"][data-kind="run"]').count(), 1);
  // The agent step's model call, tokens and cost.
  await node("plan").click();
  const panel = page.locator('.step-panel[data-step="plan"]');
  await panel.getByText("model.called").waitFor();
  assert.match(await panel.textContent(), /1,000 in \/ 500 out/);
  assert.match(await page.getByTestId("run-cost").textContent(), /\$0\.1000/);
  await shot("run-diamond");
  FIXTURE.diamondRun = run.id;
});

test("a failed run shows the failing step's error and retries from failed", async () => {
  const t = await token(FIXTURE.owner);
  const run = await api(t, "POST", "/runs", { workflow_id: FIXTURE.workflows.flaky, input: {} });
  await openRun(run.id);
  await expectStatus(RUN_STATUS, "failed");
  assert.equal(await node("fetch").getAttribute("data-status"), "failed");
  await node("fetch").click();
  const error = page.getByTestId("step-error");
  await error.waitFor();
  assert.match(await error.textContent(), /500/);
  await shot("run-failed");
  await page.getByRole("button", { name: "Retry from failed" }).click();
  await page.waitForURL((url) => url.pathname.startsWith("/console/runs/") && !url.pathname.endsWith(run.id));
  await page.locator(".dag").waitFor();
  await expectStatus(RUN_STATUS, "succeeded");
  assert.match(await page.locator(".facts").first().textContent(), /retry of/);
  FIXTURE.retriedFrom = run.id;
});

test("an approval is approved from the page with a comment", async () => {
  const t = await token(FIXTURE.owner);
  const run = await api(t, "POST", "/runs", { workflow_id: FIXTURE.workflows.approval, input: {} });
  await openRun(run.id);
  await expectStatus(NODE("gate"), "waiting");
  await node("gate").click();
  await page.getByLabel("Comment").fill("Looks good from the browser");
  await shot("run-approval");
  await page.getByRole("button", { name: "Approve" }).click();
  await expectStatus(RUN_STATUS, "succeeded");
  assert.equal(await node("after").getAttribute("data-status"), "succeeded");
  FIXTURE.approvedRun = run.id;
});

test("a paused run shows as paused, in the list too, and resumes", async () => {
  const t = await token(FIXTURE.owner);
  const run = await api(t, "POST", "/runs", { workflow_id: FIXTURE.workflows.approval, input: {} });
  await openRun(run.id);
  await expectStatus(NODE("gate"), "waiting");
  await page.getByRole("button", { name: "Pause" }).click();
  await expectStatus(RUN_STATUS, "paused");
  await page.goto(`${BASE}/console/p/${FIXTURE.project}/runs?status=paused`);
  await page.locator(`tr[data-run="${run.id}"][data-status="paused"]`).waitFor({ timeout: WAIT });
  await shot("runs-paused");
  await openRun(run.id);
  await page.getByRole("button", { name: "Resume" }).click();
  await expectStatus(RUN_STATUS, "waiting");
  await page.getByRole("button", { name: "Cancel run" }).click();
  await expectStatus(RUN_STATUS, "cancelled");
});

test("cancel stops a waiting run", async () => {
  const t = await token(FIXTURE.owner);
  const run = await api(t, "POST", "/runs", { workflow_id: FIXTURE.workflows.approval, input: {} });
  await openRun(run.id);
  await expectStatus(NODE("gate"), "waiting");
  await page.getByRole("button", { name: "Cancel run" }).click();
  await expectStatus(RUN_STATUS, "cancelled");
  assert.equal(await page.getByRole("button", { name: "Cancel run" }).count(), 0);
});

test("a run of 200 steps renders and follows live (measured, printed, not asserted)", async () => {
  const t = await token(FIXTURE.owner);
  const run = await api(t, "POST", "/runs", { workflow_id: FIXTURE.workflows.wide, input: {} });
  // Long tasks (over 50 ms) on the page's main thread, from its first moment.
  await page.addInitScript(() => {
    window.__longTasks = [];
    new PerformanceObserver((list) => {
      for (const e of list.getEntries()) window.__longTasks.push({ at: e.startTime, ms: e.duration });
    }).observe({ type: "longtask", buffered: true });
  });
  const started = Date.now();
  await page.goto(`${BASE}/console/runs/${run.id}`);
  await page.waitForFunction(() => document.querySelectorAll(".dag [data-step]").length === 200, null, { timeout: WAIT });
  const rendered = Date.now() - started;
  const renderedAt = await page.evaluate(() => performance.now());
  await expectStatus(RUN_STATUS, "succeeded");
  await page.waitForFunction(
    () => document.querySelectorAll('.dag [data-status="succeeded"]').length === 200,
    null,
    { timeout: WAIT },
  );
  const tasks = await page.evaluate(() => window.__longTasks);
  const first = tasks.filter((t) => t.at < renderedAt).map((t) => t.ms);
  const live = tasks.filter((t) => t.at >= renderedAt).map((t) => t.ms);
  const longest = (ms) => Math.round(Math.max(0, ...ms));
  console.log(
    `console-bench: 200-step run page: all nodes drawn ${rendered} ms after navigation ` +
      `(${first.length} long tasks before, the longest ${longest(first)} ms); following the run live to the end: ` +
      `${live.length} long tasks (>50 ms), the longest ${longest(live)} ms`,
  );
  await shot("run-200-steps");
});

test("the runs list filters by status and pages by keyset, updating live", async () => {
  await page.goto(`${BASE}/console/p/${FIXTURE.project}/runs`);
  await page.locator(`tr[data-run="${FIXTURE.diamondRun}"]`).waitFor();
  await page.getByLabel("Status").selectOption("cancelled");
  await page.waitForURL(/status=cancelled/);
  await page.waitForFunction(() => {
    const rows = [...document.querySelectorAll("tbody tr[data-run]")];
    return rows.length === 2 && rows.every((r) => r.getAttribute("data-status") === "cancelled");
  }, null, { timeout: WAIT });
  await page.getByLabel("Status").selectOption("");
  // A run started elsewhere appears without a reload.
  await page.evaluate(() => {
    window.__sameDocument = true;
  });
  const t = await token(FIXTURE.owner);
  const run = await api(t, "POST", "/runs", { workflow_id: FIXTURE.workflows.approval, input: {} });
  await page.locator(`tr[data-run="${run.id}"]`).waitFor({ timeout: WAIT });
  assert.equal(await page.evaluate(() => window.__sameDocument), true);
  // j / k move through the rows from the keyboard; Enter opens one.
  await page.locator("a.run-link").first().focus();
  await page.keyboard.press("j");
  const focused = await page.evaluate(() => document.activeElement?.closest("tr")?.getAttribute("data-run"));
  const second = await page.locator("tbody tr[data-run]").nth(1).getAttribute("data-run");
  assert.equal(focused, second);
  await shot("runs");
  await page.keyboard.press("Enter");
  await page.waitForURL(new RegExp(`/console/runs/${second}`));
});

test("the runs list pages by keyset, newest first, without repeats", async () => {
  const t = await token(FIXTURE.owner);
  const all = (await api(t, "GET", `/runs?project_id=${FIXTURE.project}&limit=200`)).items.map((r) => r.id);
  assert.ok(all.length > 6, "more than two pages");
  await page.goto(`${BASE}/console/p/${FIXTURE.project}/runs?limit=3`);
  const rows = () => page.$$eval("tbody tr[data-run]", (trs) => trs.map((r) => r.getAttribute("data-run")));
  const seen = [];
  for (let pages = 0; pages < Math.ceil(all.length / 3); pages++) {
    const first = all[pages * 3];
    await page.waitForFunction((id) => document.querySelector("tbody tr[data-run]")?.getAttribute("data-run") === id, first, {
      timeout: WAIT,
    });
    seen.push(...(await rows()));
    if (seen.length < all.length) await page.getByRole("button", { name: "Older →" }).click();
  }
  assert.deepEqual(seen, all);
  assert.equal(await page.getByRole("button", { name: "Older →" }).count(), 0, "the last page says so");
});

test("schedules show next fire times in their zone and UTC, and trigger now records a fire", async () => {
  await page.goto(`${BASE}/console/p/${FIXTURE.project}/schedules`);
  const card = page.locator(`[data-schedule="${FIXTURE.schedule}"]`);
  await card.locator("table.next tbody tr").first().waitFor();
  assert.equal(await card.locator("table.next tbody tr").count(), 5);
  assert.match(await card.locator("table.next thead").textContent(), /Europe\/Paris.*UTC/);
  await card.getByRole("button", { name: "Trigger now" }).click();
  await card.locator('tr[data-outcome="started"]').waitFor({ timeout: WAIT });
  await card.getByRole("button", { name: "Pause" }).click();
  await card.getByText("Paused: it does not fire.").waitFor();
  await shot("schedules");
  await card.getByRole("button", { name: "Resume" }).click();
  await card.locator("table.next tbody tr").first().waitFor();
});

test("the usage page shows the cost of the runs just made", async () => {
  const t = await token(FIXTURE.owner);
  const runs = await api(t, "GET", `/runs?project_id=${FIXTURE.project}&limit=200`);
  const total = runs.items.reduce((sum, r) => sum + Number(r.cost_usd), 0);
  assert.ok(total > 0.01, `the runs cost something: ${total}`);
  await page.goto(`${BASE}/console/p/${FIXTURE.project}/usage`);
  await page.waitForFunction(
    (want) => document.querySelector('[data-testid="usage-cost"]')?.textContent === want,
    `$${total.toFixed(4)}`,
    { timeout: WAIT },
  );
  assert.equal(await page.getByTestId("usage-runs").textContent(), String(runs.items.length));
  await page.getByTestId("per-model").getByText("fake/small").waitFor();
  await page.locator('[data-testid="daily-chart"] canvas').waitFor();
  await page.locator('.budgets tr[data-policy]').first().waitFor();
  // Tool steps: the diamond's lookup, and the flaky fetch failed once then retried.
  assert.match(await page.locator('.kinds tr[data-kind="tool"]').textContent(), /3\s*33\.3%/);
  await shot("usage");
});

test("resources are readable, with a workflow's versions", async () => {
  await page.goto(`${BASE}/console/p/${FIXTURE.project}/resources`);
  await page.locator('[data-kind="workflows"] a').first().waitFor();
  await shot("resources");
  await page.goto(`${BASE}/console/p/${FIXTURE.project}/workflows/${FIXTURE.workflows.diamond}`);
  await page.getByRole("heading", { name: "Versions" }).waitFor();
  await shot("workflow");
});

test("a user of another project cannot see the run: the page says not found", async () => {
  await signOut();
  await signIn(FIXTURE.outsider);
  await page.waitForURL(/\/console\/p\//);
  await page.goto(`${BASE}/console/runs/${FIXTURE.diamondRun}`);
  await page.getByRole("heading", { name: "Run not found" }).waitFor();
  assert.equal(await page.locator(".dag").count(), 0);
  await shot("not-found");
});

test("the dark theme applies and nothing broke the Content-Security-Policy", async () => {
  await page.emulateMedia({ colorScheme: "dark" });
  await page.goto(`${BASE}/console/p/${FIXTURE.outsiderProject}/runs`);
  await page.getByRole("heading", { name: "Runs" }).waitFor();
  const bg = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  assert.equal(bg, "rgb(21, 22, 26)");
  await shot("runs-dark");
  assert.deepEqual(problems, []);
});
