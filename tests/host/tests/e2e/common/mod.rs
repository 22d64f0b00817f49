//! The test harness: a fresh database per test, the app started in-process through the
//! real host, and a small HTTP client. Needs `SPARKOPS_TEST_DATABASE_URL` and
//! `SPARKOPS_TEST_REDIS_URL` (`infra/dev test` sets both).
#![allow(dead_code)]

pub mod process;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use sparkops_host::{AppOptions, RunningApp};

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn required_env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the tests with `infra/dev test`"))
}

/// The access-token key of test apps (the tests forge tokens with it).
pub const TEST_JWT_SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";

/// The secrets master key of test apps: `id:base64(32 bytes)`.
pub const TEST_MASTER_KEY: &str = "test1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// The app's own URL rules switched off, so tools and collectors may be plain-http fakes
/// on loopback.
pub const OPEN_URL_RULES: [(&str, &str); 2] = [
    ("SPIN_VARIABLE_TOOLS_ALLOW_HTTP", "true"),
    ("SPIN_VARIABLE_TOOLS_ALLOW_PRIVATE_HOSTS", "true"),
];

/// A database of its own for one test, migrated, plus the shared Redis.
pub struct TestEnv {
    pub database_url: String,
    pub database_name: String,
    pub redis_url: String,
    admin_url: String,
    /// Removed when the test ends.
    state_dir: PathBuf,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

impl TestEnv {
    pub async fn new() -> Self {
        let admin_url = required_env("SPARKOPS_TEST_DATABASE_URL");
        let redis_url = required_env("SPARKOPS_TEST_REDIS_URL");
        let name = format!("test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&admin_url).await;
        admin
            .batch_execute(&format!("create database {name}"))
            .await
            .unwrap();
        let mut url = url::Url::parse(&admin_url).unwrap();
        url.set_path(&name);
        let state_dir = std::env::temp_dir().join(format!("sparkops-{name}"));
        std::fs::create_dir_all(&state_dir).unwrap();
        let env = Self {
            database_url: url.to_string(),
            database_name: name,
            redis_url,
            admin_url,
            state_dir,
        };
        sparkops_ops::migrate::run(&env.database_url, &workspace().join("migrations"))
            .await
            .unwrap();
        env
    }

    /// The Redis channel this test's apps publish run nudges on.
    pub fn runs_channel(&self) -> String {
        format!("runs-{}", self.database_name)
    }

    /// `host:port` of a URL, for `allowed_outbound_hosts` templates.
    pub fn host_port(url: &str) -> String {
        let u = url::Url::parse(url).unwrap();
        format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())
    }

    /// The `SPIN_VARIABLE_*` values an app needs to reach this test's services.
    pub fn variables(&self) -> HashMap<String, String> {
        let vars = [
            ("DATABASE_URL", self.database_url.clone()),
            ("DATABASE_HOST", Self::host_port(&self.database_url)),
            ("REDIS_URL", self.redis_url.clone()),
            ("REDIS_HOST", Self::host_port(&self.redis_url)),
            ("JWT_SECRET", TEST_JWT_SECRET.to_string()),
            ("SECRETS_MASTER_KEY", TEST_MASTER_KEY.to_string()),
            // Tests share one Redis: each app nudges runs on a channel of its own.
            ("RUNS_CHANNEL", self.runs_channel()),
            // Every test calls from 127.0.0.1: per-IP limits are raised here and tested
            // on their own.
            ("RATE_LIMIT_IP_PER_MINUTE", "1000000".to_string()),
            ("LOGIN_FAILURES_PER_IP", "1000000".to_string()),
        ];
        vars.into_iter()
            .map(|(k, v)| (format!("SPIN_VARIABLE_{k}"), v))
            .collect()
    }

    pub async fn db(&self) -> tokio_postgres::Client {
        connect(&self.database_url).await
    }

    /// Sessions of this test's database by state, e.g. `idle in transaction`.
    pub async fn sessions_in_state(&self, state: &str) -> i64 {
        let admin = connect(&self.admin_url).await;
        admin
            .query_one(
                "select count(*) from pg_stat_activity where datname = $1 and state = $2",
                &[&self.database_name, &state],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// The statement each client session on the test's database ran last (not the
    /// server's own workers, such as autovacuum's).
    pub async fn last_statements(&self) -> Vec<String> {
        column(
            &connect(&self.admin_url).await,
            "select query from pg_stat_activity where datname = $1 and backend_type = 'client backend'
             order by pid",
            &[&self.database_name],
        )
        .await
    }

    /// Options for an app from `manifest` (relative to the workspace) with a private state
    /// folder; `runtime_config` is written beside it when given.
    pub fn options(&self, manifest: &str, runtime_config: Option<&str>) -> AppOptions {
        let state_dir = self
            .state_dir
            .join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&state_dir).unwrap();
        let runtime_config = runtime_config.map(|text| {
            let path = state_dir.join("runtime-config.toml");
            std::fs::write(&path, text).unwrap();
            path
        });
        // The app hands steps to its executor through its own address (`dispatch_url`), so
        // the address is chosen before the app starts.
        let listen = free_local_address();
        let mut env = self.variables();
        env.insert(
            "SPIN_VARIABLE_DISPATCH_URL".into(),
            format!("http://{listen}"),
        );
        AppOptions {
            manifest: workspace().join(manifest),
            runtime_config,
            listen,
            state_dir,
            // Compiled code is shared by every test: compiling once is the slow part.
            cache_dir: Some(workspace().join("target/host-test-cache")),
            env,
            // Guests' log lines only when asked for.
            guest_output: std::env::var_os("TEST_LOG").is_some(),
            components: Vec::new(),
            like_spinkube: false,
        }
    }
}

/// A folder of its own under the system's temporary folder, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let p =
            std::env::temp_dir().join(format!("sparkops-tmp-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback address with a free port below the kernel's ephemeral range (which starts at
/// 32768), so no outgoing connection can take it between this check and the app's bind;
/// a process-wide counter keeps two apps of this process from being handed the same one.
pub fn free_local_address() -> std::net::SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id() % 97 * 100;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + ((offset + n) % 12_000) as u16;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// One number a query counts (`select count(*) ...`).
pub async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// The first column of every row a query returns, in its order.
pub async fn column<T>(
    db: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Vec<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    db.query(sql, params)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Waits, for at most `limit`, until every run in the database has finished.
pub async fn every_run_finished(db: &tokio_postgres::Client, limit: Duration) {
    eventually_for(limit, async || {
        (count(db, "select count(*) from runs where finished_at is null").await == 0).then_some(())
    })
    .await
}

/// A response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one request with a JSON body (if any) over a new connection.
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> Reply {
    let mut headers = headers.to_vec();
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    if !body.is_empty() {
        headers.push(("content-type", "application/json"));
    }
    request_raw(method, url, &headers, body)
        .await
        .expect("the server answers")
}

/// Sends one request with a raw body over a new connection (with a 30 s bound); `Err` when
/// no connection could be made or it failed before a response arrived.
pub async fn request_raw(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Reply, String> {
    let uri: http::Uri = url.parse().unwrap();
    let authority = uri.authority().unwrap().to_string();
    let fut = async {
        let stream = tokio::net::TcpStream::connect(&authority)
            .await
            .map_err(|e| format!("connecting to {authority}: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut builder = http::Request::builder()
            .method(method)
            .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            builder = builder.header("host", &authority);
        }
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let res = sender
            .send_request(builder.body(Full::new(Bytes::from(body))).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = res.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("request timed out")
}

pub async fn get(app: &RunningApp, path: &str) -> Reply {
    request("GET", &app.url(path), &[], None).await
}

pub async fn post(app: &RunningApp, path: &str, body: Value) -> Reply {
    request("POST", &app.url(path), &[], Some(body)).await
}

/// Polls `check` every 20 ms for at most 10 s; behaviour is asserted, never timing.
pub async fn eventually<T>(check: impl AsyncFnMut() -> Option<T>) -> T {
    eventually_for(Duration::from_secs(10), check).await
}

/// As [`eventually`], for at most `limit`.
pub async fn eventually_for<T>(limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if let Some(v) = check().await {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not reached within {limit:?}");
}

/// The real app (spin.toml) for one test, with helpers that speak its API.
pub struct Api {
    pub env: TestEnv,
    pub app: RunningApp,
    state_dir: PathBuf,
    client: Client,
}

/// The API's HTTP helpers, for an app in this process ([`Api`] derefs to it) or one served
/// elsewhere (the real-Spin smoke).
pub struct Client {
    base: String,
}

impl std::ops::Deref for Api {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

/// A registered user's credentials.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub email: String,
    pub password: String,
    pub access: String,
    pub refresh: String,
}

impl Api {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts with extra `SPIN_VARIABLE_*` settings.
    pub async fn start_with(vars: &[(&str, &str)]) -> Self {
        Self::start_adjusted(vars, |_| {}).await
    }

    /// Starts with extra settings and `adjust` applied to the options (a component
    /// selection, the SpinKube trigger rule).
    pub async fn start_adjusted(
        vars: &[(&str, &str)],
        adjust: impl FnOnce(&mut AppOptions),
    ) -> Self {
        let env = TestEnv::new().await;
        let config = format!(
            "[key_value_store.default]\ntype = \"redis\"\nurl = \"{}\"\n",
            env.redis_url
        );
        let mut options = env.options("spin.toml", Some(&config));
        for (k, v) in vars {
            options.env.insert(k.to_string(), v.to_string());
        }
        adjust(&mut options);
        let app = RunningApp::start(&options).await.expect("the app starts");
        Self {
            client: Client::new(app.url("")),
            env,
            app,
            state_dir: options.state_dir,
        }
    }

    /// Starts an app whose tools may call plain-http loopback fakes, with `provider` (when
    /// given) as the model provider `fake` (app key `sk-app-key`), and `extra` settings.
    pub async fn for_fakes(provider: Option<&FakeServer>, extra: &[(&str, &str)]) -> Self {
        let providers = provider.map(|p| format!("fake={}", p.url("/v1")));
        let mut vars = OPEN_URL_RULES.to_vec();
        if let Some(p) = &providers {
            vars.push(("SPIN_VARIABLE_MODEL_PROVIDERS", p.as_str()));
            vars.push(("SPIN_VARIABLE_MODEL_PROVIDER_KEYS", "fake=sk-app-key"));
        }
        vars.extend_from_slice(extra);
        Self::start_with(&vars).await
    }

    /// Everything the components have written to stdout and stderr so far (the host's
    /// per-component log files, as `spin up` keeps them).
    pub fn guest_logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.state_dir.join("logs")).unwrap() {
            all += &std::fs::read_to_string(entry.unwrap().path()).unwrap();
        }
        all
    }

    /// Fires the sweeper as at `seconds` from now (tests choose the time; nothing waits
    /// for the clock).
    pub async fn sweep_at(&self, seconds: i64) {
        self.tick("sweeper", chrono::Utc::now().timestamp() + seconds)
            .await;
    }

    /// Fires a cron component (`sweeper`, `scheduler`, `exporter`) once, as at Unix time
    /// `at`.
    pub async fn tick(&self, component: &str, at: i64) {
        self.app
            .inner
            .handle_cron(component, at as u64)
            .await
            .unwrap();
    }

    /// A digest of every row of the project-resource tables, to show a request changed nothing.
    pub async fn snapshot(&self) -> Vec<String> {
        let db = self.env.db().await;
        let mut digests = Vec::new();
        for table in [
            "projects",
            "memberships",
            "agents",
            "agent_tools",
            "tools",
            "workflows",
            "workflow_versions",
            "policies",
            "schedules",
            "model_prices",
            "project_secrets",
        ] {
            let row = db
                .query_one(
                    &format!("select md5(coalesce(string_agg(t::text, ',' order by t::text), '')) from {table} t"),
                    &[],
                )
                .await
                .unwrap();
            digests.push(format!("{table}:{}", row.get::<_, String>(0)));
        }
        digests
    }

    pub async fn count(&self, table: &str) -> i64 {
        self.env
            .db()
            .await
            .query_one(&format!("select count(*) from {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }
}

impl Client {
    /// A client of the app served at `base` (e.g. `http://127.0.0.1:3000`).
    pub fn new(base: impl Into<String>) -> Self {
        Self { base: base.into() }
    }

    /// The URL of `path` on the app.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends a request with an optional bearer token.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("authorization", a.as_str())).collect();
        request(method, &self.url(path), &headers, body).await
    }

    /// The status of a request with an optional bearer token.
    pub async fn status(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> u16 {
        self.call(method, path, token, body).await.status
    }

    /// Waits until run `id` has finished; the run.
    pub async fn finished_run(&self, token: &str, id: &str) -> Value {
        let path = format!("/api/v1/runs/{id}");
        eventually(async || {
            let run = self.call("GET", &path, Some(token), None).await.json();
            (!["queued", "running", "waiting", "paused", "cancelling"]
                .contains(&run["status"].as_str().unwrap()))
            .then_some(run)
        })
        .await
    }

    /// Starts a run of `workflow_id` and waits until it has finished; the run.
    pub async fn run_to_end(&self, token: &str, workflow_id: &str, input: Value) -> Value {
        let run = self
            .start_run(token, &Value::String(workflow_id.into()), input)
            .await;
        self.finished_run(token, run["id"].as_str().unwrap()).await
    }

    /// Sets the project's price of `model` (USD per million tokens).
    pub async fn set_price(
        &self,
        token: &str,
        project: &str,
        model: &str,
        input: &str,
        output: &str,
    ) {
        let res = self
            .call(
                "PUT",
                &format!("/api/v1/models/prices/{model}?project_id={project}"),
                Some(token),
                Some(
                    serde_json::json!({"input_per_mtok_usd": input, "output_per_mtok_usd": output}),
                ),
            )
            .await;
        assert!(res.status < 300, "{}", String::from_utf8_lossy(&res.body));
    }

    /// A run's `steps` or `events` (one page of them, oldest first).
    pub async fn run_items(&self, token: &str, run: &Value, what: &str) -> Vec<Value> {
        let path = format!("/api/v1/runs/{}/{what}", run["id"].as_str().unwrap());
        self.call("GET", &path, Some(token), None).await.json()["items"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// `PATCH /runs/{id}/cancel` as the holder of `token`.
    pub async fn cancel(&self, token: &str, run_id: &str) -> Reply {
        let path = format!("/api/v1/runs/{run_id}/cancel");
        self.call("PATCH", &path, Some(token), None).await
    }

    /// Sends a request with a bearer token and extra headers.
    pub async fn call_with(
        &self,
        method: &str,
        path: &str,
        token: &str,
        extra: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let auth = format!("Bearer {token}");
        let mut headers: Vec<(&str, &str)> = vec![("authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        request(method, &self.url(path), &headers, body).await
    }

    pub async fn register(&self, name: &str) -> User {
        let email = format!("{name}-{}@example.com", uuid::Uuid::new_v4().simple());
        let password = format!("pw-{name}-correct-horse");
        let res = self
            .call(
                "POST",
                "/api/v1/auth/register",
                None,
                Some(serde_json::json!({"email": email, "password": password, "name": name})),
            )
            .await;
        assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
        let body = res.json();
        User {
            id: body["user"]["id"].as_str().unwrap().to_string(),
            email,
            password,
            access: body["access_token"].as_str().unwrap().to_string(),
            refresh: body["refresh_token"].as_str().unwrap().to_string(),
        }
    }

    /// Creates a project as `who`, checking the `201` and its `Location`.
    pub async fn create_project(&self, who: &User, body: Value) -> Value {
        let res = self
            .call("POST", "/api/v1/projects", Some(&who.access), Some(body))
            .await;
        assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
        let project = res.json();
        let location = format!("/api/v1/projects/{}", project["id"].as_str().unwrap());
        assert_eq!(res.header("location"), Some(location.as_str()));
        project
    }

    /// Points `project`'s traces at `url`, as `who` (an admin of it).
    pub async fn set_trace_endpoint(&self, who: &User, project: &str, url: &str) {
        let res = self
            .call(
                "PATCH",
                &format!("/api/v1/projects/{project}"),
                Some(&who.access),
                Some(serde_json::json!({"trace_endpoint": url})),
            )
            .await;
        assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    }

    /// Starts a run of `workflow_id` with `input` as `token`; the run as created.
    pub async fn start_run(&self, token: &str, workflow_id: &Value, input: Value) -> Value {
        let body = serde_json::json!({"workflow_id": workflow_id, "input": input});
        self.create(token, "/api/v1/runs", body).await
    }

    /// Adds `member` to `project` with `role`, as `owner`.
    pub async fn add_member(&self, owner: &User, project: &str, member: &User, role: &str) {
        let res = self
            .call(
                "POST",
                &format!("/api/v1/projects/{project}/members"),
                Some(&owner.access),
                Some(serde_json::json!({"email": member.email, "role": role})),
            )
            .await;
        assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    }

    /// Creates a resource at `path` (e.g. `/api/v1/agents`) as `token`, checking `201`,
    /// `Location` and, for versioned resources, `ETag`; the created resource.
    pub async fn create(&self, token: &str, path: &str, body: Value) -> Value {
        let res = self.call("POST", path, Some(token), Some(body)).await;
        assert_eq!(
            res.status,
            201,
            "POST {path}: {}",
            String::from_utf8_lossy(&res.body)
        );
        let created = res.json();
        let id = created["id"].as_str().unwrap();
        assert_eq!(
            res.header("location"),
            Some(format!("{path}/{id}").as_str())
        );
        if !created["version"].is_null() {
            assert_eq!(
                res.header("etag"),
                Some(format!("\"{}\"", created["version"]).as_str())
            );
        }
        created
    }

    /// The status of `GET /auth/me` with `token`.
    pub async fn me_status(&self, token: &str) -> u16 {
        self.status("GET", "/api/v1/auth/me", Some(token), None)
            .await
    }

    /// `POST /auth/refresh` with `token`.
    pub async fn refresh(&self, token: &str) -> Reply {
        let body = serde_json::json!({"refresh_token": token});
        self.call("POST", "/api/v1/auth/refresh", None, Some(body))
            .await
    }

    /// `POST /auth/logout` of `token` as `who`.
    pub async fn logout(&self, who: &User, token: &str) -> Reply {
        let body = serde_json::json!({"refresh_token": token});
        self.call("POST", "/api/v1/auth/logout", Some(&who.access), Some(body))
            .await
    }

    /// Creates an API key as `who`; the reply's JSON (with its one-time `secret`).
    pub async fn create_key(&self, who: &User, project_id: &str, role: &str) -> Value {
        let body = serde_json::json!({"name": "key", "project_id": project_id, "role": role});
        let res = self
            .call("POST", "/api/v1/api-keys", Some(&who.access), Some(body))
            .await;
        assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
        res.json()
    }
}

/// A request a fake third party received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// One scripted answer of a [`FakeServer`].
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(&'static str, String)>,
}

/// A scripted HTTP third party on loopback (a tool, a provider): answers every request
/// with `status` and `body` after `delay`, and records what it received.
pub struct FakeServer {
    pub addr: std::net::SocketAddr,
    received: std::sync::Arc<std::sync::Mutex<Vec<Recorded>>>,
}

impl FakeServer {
    pub async fn start(status: u16, body: Value, delay: Duration) -> Self {
        Self::scripted(vec![(status, body)], delay).await
    }

    /// Answers the n-th request with `answers[n]`, and every later one with the last.
    pub async fn scripted(answers: Vec<(u16, Value)>, delay: Duration) -> Self {
        let answers = answers
            .into_iter()
            .map(|(status, body)| Answer {
                status,
                body,
                headers: Vec::new(),
            })
            .collect();
        Self::answering(answers, delay).await
    }

    /// Answers the n-th request with `answers[n]` (headers included), and every later one
    /// with the last.
    pub async fn answering(answers: Vec<Answer>, delay: Duration) -> Self {
        let answers = std::sync::Arc::new(answers);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = received.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (log, answers) = (log.clone(), answers.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            let (log, answers) = (log.clone(), answers.clone());
                            async move {
                                let (parts, incoming) = req.into_parts();
                                let bytes = incoming.collect().await?.to_bytes();
                                let answer = {
                                    let mut log = log.lock().unwrap();
                                    log.push(Recorded {
                                        method: parts.method.to_string(),
                                        uri: parts.uri.to_string(),
                                        headers: parts.headers,
                                        body: bytes,
                                    });
                                    answers[(log.len() - 1).min(answers.len() - 1)].clone()
                                };
                                tokio::time::sleep(delay).await;
                                let mut res = http::Response::new(Full::new(Bytes::from(
                                    answer.body.to_string(),
                                )));
                                *res.status_mut() =
                                    http::StatusCode::from_u16(answer.status).unwrap();
                                res.headers_mut()
                                    .insert("content-type", "application/json".parse().unwrap());
                                for (k, v) in &answer.headers {
                                    res.headers_mut().insert(*k, v.parse().unwrap());
                                }
                                Ok::<_, hyper::Error>(res)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self { addr, received }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Recorded> {
        self.received.lock().unwrap().clone()
    }

    /// The `Idempotency-Key` of every request received, in order.
    pub fn idempotency_keys(&self) -> Vec<String> {
        self.received()
            .iter()
            .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_string())
            .collect()
    }
}

/// One Server-Sent Event as a client parses it.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub id: String,
    pub event: String,
    pub data: Value,
}

/// What a Server-Sent Events client read.
#[derive(Debug)]
pub struct SseRead {
    pub status: u16,
    pub content_type: String,
    pub events: Vec<SseEvent>,
    /// The server ended the stream (rather than the client hanging up).
    pub ended: bool,
}

/// Reads a Server-Sent Events stream until the server ends it, or until `enough` says so
/// (then the client hangs up); at most 30 s.
pub async fn read_sse(
    url: &str,
    headers: &[(&str, &str)],
    enough: impl Fn(&[SseEvent]) -> bool,
) -> SseRead {
    let uri: http::Uri = url.parse().unwrap();
    let authority = uri.authority().unwrap().to_string();
    let fut = async {
        let stream = tokio::net::TcpStream::connect(&authority).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let mut builder = http::Request::builder()
            .uri(uri.path_and_query().unwrap().as_str())
            .header("host", &authority)
            .header("accept", "text/event-stream");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        let res = sender
            .send_request(builder.body(Full::new(Bytes::new())).unwrap())
            .await
            .unwrap();
        let status = res.status().as_u16();
        let content_type = res
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let mut body = res.into_body();
        let (mut buffer, mut events, mut ended) = (String::new(), Vec::new(), false);
        while !enough(&events) {
            let Some(frame) = body.frame().await else {
                ended = true;
                break;
            };
            let Ok(data) = frame.unwrap().into_data() else {
                continue;
            };
            buffer += std::str::from_utf8(&data).unwrap();
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                        .map(str::to_string)
                };
                // Comment lines (`: keep-alive`) carry no event.
                if let Some(data) = field("data") {
                    events.push(SseEvent {
                        id: field("id").unwrap_or_default(),
                        event: field("event").unwrap_or_default(),
                        data: serde_json::from_str(&data).unwrap(),
                    });
                }
            }
        }
        conn.abort();
        SseRead {
            status,
            content_type,
            events,
            ended,
        }
    };
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("the event stream did not end in time")
}

/// OpenAI chat completions answers, as a provider sends them (for [`FakeServer`] scripts).
pub mod openai {
    use super::Answer;
    use serde_json::{Value, json};

    fn completion(message: Value, finish: &str, prompt: u64, completion: u64) -> Answer {
        Answer {
            status: 200,
            body: json!({
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 1_767_000_000, "model": "fake-model",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
            }),
            headers: Vec::new(),
        }
    }

    /// A final answer.
    pub fn text(content: &str, prompt: u64, completion: u64) -> Answer {
        self::completion(
            json!({"role": "assistant", "content": content}),
            "stop",
            prompt,
            completion,
        )
    }

    /// A turn that calls tools: `(call id, function name, arguments)`.
    pub fn tool_calls(calls: &[(&str, &str, Value)], prompt: u64, completion: u64) -> Answer {
        let calls: Vec<Value> = calls
            .iter()
            .map(|(id, name, args)| {
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": args.to_string()}})
            })
            .collect();
        self::completion(
            json!({"role": "assistant", "content": null, "tool_calls": calls}),
            "tool_calls",
            prompt,
            completion,
        )
    }

    /// An error answer with OpenAI's error body, and `Retry-After` when given.
    pub fn error(status: u16, retry_after: Option<&str>) -> Answer {
        Answer {
            status,
            body: json!({"error": {"message": format!("fake error {status}"), "type": "fake", "code": null}}),
            headers: retry_after
                .map(|r| vec![("retry-after", r.to_string())])
                .unwrap_or_default(),
        }
    }
}
