//! The request pipeline every API component runs: request id, CORS, body limit, per-IP rate
//! limit, then the component's router with a [`Ctx`] that authenticates (access JWT or API
//! key, with a per-principal rate limit), loads a project through the caller's membership,
//! and makes creating requests idempotent. Errors become problems; every request is logged
//! as one JSON line (no bodies, no credentials).

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sparkops_core::auth::{self, TokenKey};
use sparkops_core::db::{self as core_db, AS_TIMESTAMPTZ, Connection as _, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::ratelimit::{Decision, Limit};
use sparkops_core::roles::{Action, Role};
use spin_sdk::http::{IncomingRequest, Method, Response};

use crate::db::Db;
use crate::http::{HttpRequest, Reply, problem, request_id};
pub use crate::work::Work;

/// The credential a request carries: `Authorization: Bearer <JWT | sk_...>`, else
/// `X-API-Key: sk_...`.
fn credential(req: &HttpRequest) -> Option<&str> {
    let bearer = req
        .header("authorization")
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim);
    bearer
        .or_else(|| req.header("x-api-key").map(str::trim))
        .filter(|c| !c.is_empty())
}

/// Requests per minute of one caller (a user or an API key).
fn caller_limit() -> Limit {
    Limit {
        limit: crate::settings().rate_limit_per_minute,
        window_secs: 60,
    }
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub user_id: String,
    /// Set when the caller used an API key: it reaches only this project, with this role.
    pub api_key: Option<ApiKeyGrant>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyGrant {
    pub api_key_id: String,
    pub project_id: String,
    pub role: Role,
}

impl Principal {
    /// A stable name for rate limits and idempotency scopes.
    pub fn key(&self) -> String {
        match &self.api_key {
            Some(k) => format!("key:{}", k.api_key_id),
            None => format!("user:{}", self.user_id),
        }
    }

    /// Whether the caller may reach `project_id` at all: an API key reaches only its own.
    fn reaches(&self, project_id: &str) -> bool {
        self.api_key
            .as_ref()
            .is_none_or(|k| k.project_id == project_id)
    }
}

/// A project the caller may see, and the caller's role in it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectAccess {
    pub project_id: String,
    pub role: Role,
}

/// Per-request state and services for handlers: the [`Work`] every piece of work has
/// (it derefs to it), plus what only a request needs.
pub struct Ctx {
    work: Work,
    /// The tightest rate-limit decision so far, sent as `RateLimit-*` headers.
    rate: Option<Decision>,
    /// The project and run the request turned out to be about, for its log line.
    logged_project: Option<String>,
    logged_run: Option<String>,
    /// The caller of the request's access token, counted by the pipeline with the
    /// address, and the verdict of its limit (`None`: the limiter was unavailable).
    counted_caller: Option<(Principal, Option<Decision>)>,
}

impl std::ops::Deref for Ctx {
    type Target = Work;

    fn deref(&self) -> &Work {
        &self.work
    }
}

impl std::ops::DerefMut for Ctx {
    fn deref_mut(&mut self) -> &mut Work {
        &mut self.work
    }
}

impl Ctx {
    /// The context of the request `request_id`.
    pub fn new(request_id: String) -> Self {
        Self {
            work: Work::new(request_id),
            rate: None,
            logged_project: None,
            logged_run: None,
            counted_caller: None,
        }
    }

    /// Authenticates `Authorization: Bearer <JWT | sk_...>` or `X-API-Key: sk_...`, then
    /// counts the request against the principal's rate limit (counted already, with the
    /// address's, when the pipeline read a valid access token: see [`Ctx::count_request`]).
    pub fn authenticate(&mut self, req: &HttpRequest) -> Result<Principal, ApiError> {
        if let Some((principal, decision)) = self.counted_caller.take() {
            if let Some(decision) = decision {
                self.note(&decision);
                decision.check()?;
            }
            return Ok(principal);
        }
        let Some(credential) = credential(req) else {
            return Err(ApiError::Unauthenticated(
                "a bearer token or API key is required".into(),
            ));
        };
        let principal = if credential.starts_with("sk_") {
            self.api_key_principal(credential)?
        } else {
            self.token_principal(credential)?
        };
        self.rate_limit(&format!("p:{}", principal.key()), caller_limit())?;
        Ok(principal)
    }

    /// Counts the request against its address's rate limit (over it is `429`) and, when it
    /// carries a valid access token, against its caller's in the same round trip; the
    /// caller's verdict waits for the route to authenticate, so a public route never answers
    /// `429` for it. (An API key needs a database lookup: it is counted when the route
    /// authenticates, after the address's limit has passed.)
    fn count_request(&mut self, req: &HttpRequest) -> Result<(), ApiError> {
        let ip_key = format!("ip:{}", req.client_ip());
        let ip_limit = Limit {
            limit: crate::settings().rate_limit_ip_per_minute,
            window_secs: 60,
        };
        let caller = credential(req)
            .filter(|c| !c.starts_with("sk_"))
            .and_then(|token| self.token_principal(token).ok());
        let Some(caller) = caller else {
            return self.rate_limit(&ip_key, ip_limit);
        };
        let caller_key = format!("p:{}", caller.key());
        let limit = caller_limit();
        let keys = [
            (ip_key.as_str(), ip_limit.window_secs),
            (caller_key.as_str(), limit.window_secs),
        ];
        match crate::ratelimit::count_all(&keys) {
            Ok(counts) => {
                let (ip, caller_decision) = (
                    ip_limit.decide(counts[0].0, counts[0].1),
                    limit.decide(counts[1].0, counts[1].1),
                );
                self.counted_caller = Some((caller, Some(caller_decision)));
                self.note(&ip);
                ip.check()
            }
            Err(e) => {
                log_warn("rate limiter unavailable", &e);
                self.counted_caller = Some((caller, None));
                Ok(())
            }
        }
    }

    /// The user of a valid access token.
    fn token_principal(&self, token: &str) -> Result<Principal, ApiError> {
        let claims = token_key()?
            .verify(token, self.now.timestamp() as u64)
            .map_err(|_| {
                ApiError::Unauthenticated("the access token is invalid or expired".into())
            })?;
        Ok(Principal {
            user_id: claims.user_id,
            api_key: None,
        })
    }

    fn api_key_principal(&mut self, secret: &str) -> Result<Principal, ApiError> {
        let invalid =
            || ApiError::Unauthenticated("the API key is invalid, revoked or expired".into());
        let prefix = auth::api_key_prefix(secret).ok_or_else(invalid)?;
        let now = V::Timestamp(self.now);
        let rows = self
            .db()?
            .query(
                &format!(
                    "select k.api_key_id::text, k.project_id::text, k.key_hash, k.role, k.created_by::text
                     from api_keys k
                     join projects p on p.project_id = k.project_id and p.deleted_at is null
                     where k.prefix = $1 and k.revoked_at is null
                       and (k.expires_at is null or k.expires_at > $2{})",
                    core_db::AS_TIMESTAMPTZ
                ),
                &[V::Text(prefix.to_string()), now],
            )
            .map_err(internal("looking up an API key"))?;
        let row = rows.first().ok_or_else(invalid)?;
        let hash = row.text(2).map_err(internal("reading an API key"))?;
        if !auth::constant_time_eq(&hash, &auth::token_hash(secret)) {
            return Err(invalid());
        }
        let role = Role::parse(&row.text(3).map_err(internal("reading an API key"))?)
            .ok_or_else(|| ApiError::internal("an API key has an unknown role"))?;
        Ok(Principal {
            user_id: row.text(4).map_err(internal("reading an API key"))?,
            api_key: Some(ApiKeyGrant {
                api_key_id: row.text(0).map_err(internal("reading an API key"))?,
                project_id: row.text(1).map_err(internal("reading an API key"))?,
                role,
            }),
        })
    }

    /// Loads `project_id` through the caller's membership: `404` when the caller cannot see
    /// it (never `403`, so existence does not leak), `403` when the role lacks `action`.
    pub fn project(
        &mut self,
        who: &Principal,
        project_id: &str,
        action: Action,
    ) -> Result<ProjectAccess, ApiError> {
        let not_found = || ApiError::NotFound(format!("no project {project_id}"));
        let project_id = sparkops_core::ids::parse_uuid(project_id, "project")?;
        // Checked before the read too, so a key never costs a read of another project.
        if !who.reaches(&project_id) {
            return Err(not_found());
        }
        let rows = self
            .db()?
            .query(
                "select m.role from memberships m
                 join projects p on p.project_id = m.project_id and p.deleted_at is null
                 where m.project_id = $1 and m.user_id = $2",
                &[V::Uuid(project_id.clone()), V::Uuid(who.user_id.clone())],
            )
            .map_err(internal("loading a membership"))?;
        let member_role = rows.first().map(|r| r.text(0)).transpose()?;
        self.grant(who, &project_id, member_role.as_deref(), action)
    }

    /// The caller's access to `project_id`, given its membership role there (`None`: not a
    /// member) read by the handler's own query: `404` when the caller cannot see the project
    /// (a key for another project included), `403` when the role lacks `action`.
    pub fn grant(
        &mut self,
        who: &Principal,
        project_id: &str,
        member_role: Option<&str>,
        action: Action,
    ) -> Result<ProjectAccess, ApiError> {
        let not_found = || ApiError::NotFound(format!("no project {project_id}"));
        if !who.reaches(project_id) {
            return Err(not_found());
        }
        let member_role = member_role.and_then(Role::parse).ok_or_else(not_found)?;
        // A key acts with at most its creator's current role.
        let role = match &who.api_key {
            Some(key) => key.role.min(member_role),
            None => member_role,
        };
        role.require(action)?;
        self.logged_project = Some(project_id.to_string());
        Ok(ProjectAccess {
            project_id: project_id.to_string(),
            role,
        })
    }

    /// Names the run this request is about in its log line.
    pub fn log_run(&mut self, run_id: &str) {
        self.logged_run = Some(run_id.to_string());
    }

    /// Counts one request under `key`; over the limit is `429`. The tighter of the limits
    /// seen so far goes out in the `RateLimit-*` headers. Redis being down lets requests
    /// through (logged): an outage of the limiter must not become an outage of the API.
    pub fn rate_limit(&mut self, key: &str, limit: Limit) -> Result<(), ApiError> {
        let decision = match crate::ratelimit::count(key, limit.window_secs) {
            Ok((count, ttl)) => limit.decide(count, ttl),
            Err(e) => {
                log_warn("rate limiter unavailable", &e);
                return Ok(());
            }
        };
        self.note(&decision);
        decision.check()
    }

    /// Keeps the tighter of `decision` and the limits seen so far for the headers.
    fn note(&mut self, decision: &Decision) {
        self.rate = Some(match self.rate.take() {
            Some(seen) => seen.tighter(decision.clone()),
            None => decision.clone(),
        });
    }

    /// Runs a creating request once per `Idempotency-Key` (24 h): `create` runs in the
    /// transaction that stores its reply, so a retry with the same key and body gets the
    /// first reply back and the write happens once; the same key with another body is `422`.
    /// Without the header it is a plain transaction. A top-level `secret` of the reply (a
    /// credential shown once, as a new API key's) is stored sealed under the secrets master
    /// key and opened only to answer a replay.
    pub fn create_once(
        &mut self,
        req: &HttpRequest,
        who: &Principal,
        create: impl FnOnce(&core_db::Tx<'_, Db>, &Work) -> Result<Reply, ApiError>,
    ) -> Result<Reply, ApiError> {
        let key = req.header("idempotency-key").map(str::to_string);
        self.create_once_as(req, who.key(), ("Idempotency-Key", key), create)
    }

    /// [`Ctx::create_once`] for a caller named `principal` (not a user: a trigger's sender),
    /// with the key from elsewhere than `Idempotency-Key`: `(the header it came from, its
    /// value)`.
    pub fn create_once_as(
        &mut self,
        req: &HttpRequest,
        principal: String,
        (header, key): (&'static str, Option<String>),
        create: impl FnOnce(&core_db::Tx<'_, Db>, &Work) -> Result<Reply, ApiError>,
    ) -> Result<Reply, ApiError> {
        if let Some(k) = &key {
            check_idempotency_key(header, k)?;
        }
        let request_hash = auth::token_hash(&format!(
            "{}\n{}",
            req.path,
            String::from_utf8_lossy(&req.body)
        ));
        let scope = (principal, req.path.clone());
        self.transaction(|tx, ctx| {
            let Some(key) = &key else {
                return create(tx, ctx);
            };
            tx.execute(
                "delete from idempotency_keys
                 where principal = $1 and route = $2 and key = $3
                   and created_at < now() - make_interval(hours => $4)",
                &[
                    V::Text(scope.0.clone()),
                    V::Text(scope.1.clone()),
                    V::Text(key.clone()),
                    V::Int32(IDEMPOTENCY_HOURS),
                ],
            )?;
            let inserted = tx.execute(
                "insert into idempotency_keys (principal, route, key, request_hash)
                 values ($1, $2, $3, $4) on conflict do nothing",
                &[
                    V::Text(scope.0.clone()),
                    V::Text(scope.1.clone()),
                    V::Text(key.clone()),
                    V::Text(request_hash.clone()),
                ],
            )?;
            if inserted == 0 {
                return replay(tx, &scope, key, &request_hash, header);
            }
            let reply = create(tx, ctx)?;
            let stored = reply
                .body
                .clone()
                .map(|b| seal_secret(b, &scope, key))
                .transpose()?;
            let location = reply
                .headers
                .iter()
                .find(|(k, _)| k == "location")
                .map(|(_, v)| v.clone());
            tx.execute(
                "update idempotency_keys set status = $4, response = $5, location = $6
                 where principal = $1 and route = $2 and key = $3",
                &[
                    V::Text(scope.0.clone()),
                    V::Text(scope.1.clone()),
                    V::Text(key.clone()),
                    V::Int32(reply.status.into()),
                    stored.map(V::Json).unwrap_or(V::Null),
                    location.map(V::Text).unwrap_or(V::Null),
                ],
            )?;
            Ok(reply)
        })
    }
}

fn replay(
    tx: &core_db::Tx<'_, Db>,
    (principal, route): &(String, String),
    key: &str,
    request_hash: &str,
    header: &'static str,
) -> Result<Reply, ApiError> {
    let rows = tx.query(
        "select request_hash, status, response, location from idempotency_keys
         where principal = $1 and route = $2 and key = $3",
        &[
            V::Text(principal.clone()),
            V::Text(route.clone()),
            V::Text(key.to_string()),
        ],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::internal("the idempotency upsert returned no row"))?;
    if row.text(0)? != request_hash {
        return Err(ApiError::field(
            header,
            "was already used with another request body",
        ));
    }
    let status = row.int(1).map_err(internal("reading a stored answer"))? as u16;
    let body = match &row.0[2] {
        V::Json(v) => Some(open_secret(
            v.clone(),
            &(principal.clone(), route.clone()),
            key,
        )?),
        _ => None,
    };
    let mut reply = Reply {
        status,
        body,
        headers: vec![("idempotent-replayed".into(), "true".into())],
        text: None,
    };
    if let Ok(location) = row.text(3) {
        reply.headers.push(("location".into(), location));
    }
    Ok(reply)
}

/// Where a stored reply keeps its sealed `secret` (see [`Ctx::create_once`]).
const SEALED_SECRET: &str = "secret_sealed";

/// How long an `Idempotency-Key` holds its first reply.
pub const IDEMPOTENCY_HOURS: i32 = 24;

/// Removes up to `batch` stored replies older than [`IDEMPOTENCY_HOURS`] at `now` (the
/// sweeper's tick); how many it removed.
pub fn prune_idempotency_keys(db: &Db, now: DateTime<Utc>, batch: i64) -> Result<u64, ApiError> {
    db.execute(
        &format!(
            "delete from idempotency_keys where ctid = any(array(
                 select ctid from idempotency_keys
                 where created_at < $1{AS_TIMESTAMPTZ} - make_interval(hours => $2) limit $3))"
        ),
        &[
            V::Timestamp(now),
            V::Int32(IDEMPOTENCY_HOURS),
            V::Int64(batch),
        ],
    )
    .map_err(ApiError::from)
}

/// What a stored secret is bound to (the associated data of its sealing): its
/// idempotency row, so it opens only as that row's reply.
fn sealed_as(principal: &str, route: &str, key: &str) -> (String, String) {
    (
        format!("idempotency\n{principal}"),
        format!("{route}\n{key}"),
    )
}

/// The reply as stored: its `secret`, if any, sealed and bound to its idempotency row.
fn seal_secret(
    mut body: Value,
    (principal, route): &(String, String),
    key: &str,
) -> Result<Value, ApiError> {
    let Some(Value::String(secret)) = body.as_object_mut().and_then(|o| o.remove("secret")) else {
        return Ok(body);
    };
    let (owner, name) = sealed_as(principal, route, key);
    let sealed = master_keys()?.seal(&owner, &name, &secret, crate::random_array());
    body[SEALED_SECRET] = Value::String(sealed.to_text());
    Ok(body)
}

/// The stored reply as first answered: its sealed `secret` opened.
fn open_secret(
    mut body: Value,
    (principal, route): &(String, String),
    key: &str,
) -> Result<Value, ApiError> {
    let Some(Value::String(text)) = body.as_object_mut().and_then(|o| o.remove(SEALED_SECRET))
    else {
        return Ok(body);
    };
    let sealed = sparkops_core::secrets::Sealed::from_text(&text)
        .ok_or_else(|| ApiError::internal("a stored reply's sealed secret does not read"))?;
    let (owner, name) = sealed_as(principal, route, key);
    let secret = master_keys()?
        .open(&owner, &name, &sealed)
        .map_err(|e| ApiError::internal(format!("opening a stored reply's secret: {e:?}")))?;
    body["secret"] = Value::String(secret);
    Ok(body)
}

/// The access-token key from the `jwt_secret` variable.
pub fn token_key() -> Result<TokenKey, ApiError> {
    let secret = crate::variable("jwt_secret").map_err(ApiError::internal)?;
    TokenKey::new(secret.as_bytes())
        .map_err(|_| ApiError::internal("jwt_secret is too short: at least 32 bytes"))
}

/// The secrets master keys from the `secrets_master_key` variable (`id:base64key`, newest
/// first, comma separated).
pub fn master_keys() -> Result<sparkops_core::secrets::MasterKeys, ApiError> {
    let spec = crate::variable("secrets_master_key").map_err(ApiError::internal)?;
    sparkops_core::secrets::MasterKeys::parse(&spec)
        .map_err(|e| ApiError::internal(format!("secrets_master_key is malformed: {e:?}")))
}

/// Maps a failure to a `500` that says what was being done and why it failed (the
/// pipeline logs it with the request id).
pub fn internal<E: std::fmt::Display>(doing: &'static str) -> impl Fn(E) -> ApiError {
    move |e| ApiError::internal(format!("{doing}: {e}"))
}

fn log_warn(msg: &str, err: &dyn std::fmt::Display) {
    crate::log_line(&json!({"level": "warn", "msg": msg, "error": err.to_string()}));
}

/// CORS headers for an allowed `Origin` (the `cors_allowed_origins` variable, comma
/// separated, `*` for any).
fn cors_headers(req: &HttpRequest) -> Vec<(String, String)> {
    let Some(origin) = req.header("origin") else {
        return Vec::new();
    };
    let allowed = crate::variable("cors_allowed_origins").unwrap_or_default();
    let ok = allowed
        .split(',')
        .map(str::trim)
        .any(|a| a == "*" || a == origin);
    if !ok {
        return Vec::new();
    }
    vec![
        ("access-control-allow-origin".into(), origin.to_string()),
        ("vary".into(), "Origin".into()),
        (
            "access-control-expose-headers".into(),
            "x-request-id, location, retry-after, ratelimit-limit, ratelimit-remaining, ratelimit-reset".into(),
        ),
    ]
}

fn is_preflight(req: &HttpRequest) -> bool {
    req.method == Method::Options && req.header("access-control-request-method").is_some()
}

/// What a streaming router answers: a reply, or a body produced over time.
pub enum Served {
    Reply(Reply),
    Stream(Box<dyn BodyStream>),
}

impl From<Reply> for Served {
    fn from(reply: Reply) -> Self {
        Served::Reply(reply)
    }
}

/// A response body written chunk by chunk (Server-Sent Events), after the checks of the
/// request have passed and a `200` has gone out.
pub trait BodyStream {
    /// The stream's `content-type`.
    fn content_type(&self) -> &'static str;
    /// The next chunk, waiting for it as long as it needs; `None` ends the body.
    fn next(&mut self, ctx: &mut Ctx) -> Result<Option<Vec<u8>>, ApiError>;
}

/// The rule for a key that makes a creating request happen once (`Idempotency-Key`, a
/// trigger sender's delivery id): 1 to 255 characters, so it can be stored. `field` names
/// it in the 422.
pub fn check_idempotency_key(field: &str, key: &str) -> Result<(), ApiError> {
    if (1..=255).contains(&key.len()) {
        Ok(())
    } else {
        Err(ApiError::field(field, "must be 1 to 255 characters"))
    }
}

/// Runs the pipeline around `route`, the component's router.
pub async fn serve(
    incoming: IncomingRequest,
    route: fn(&mut Ctx, &HttpRequest) -> Result<Reply, ApiError>,
) -> Response {
    run(incoming, |ctx, req| route(ctx, req).map(Served::Reply))
        .await
        .0
}

/// [`serve`] for a router that may answer with a [`BodyStream`]: the response goes out
/// through `out` and the stream is written until it ends or the client goes away.
pub async fn serve_streaming(
    incoming: IncomingRequest,
    out: spin_sdk::http::ResponseOutparam,
    route: fn(&mut Ctx, &HttpRequest) -> Result<Served, ApiError>,
) {
    use futures::SinkExt;
    let (mut response, mut ctx, stream) = run(incoming, route).await;
    let body = response.body().to_vec();
    // A whole reply goes out with its length, in one piece, not chunked (no length on the
    // statuses that have no content).
    if stream.is_none() && !matches!(*response.status(), 204 | 304) {
        response.set_header("content-length", body.len().to_string());
    }
    let Ok(outgoing) = spin_sdk::http::OutgoingResponse::try_from(response) else {
        return;
    };
    let mut sink = outgoing.take_body();
    out.set(outgoing);
    if !body.is_empty() && sink.send(body).await.is_err() {
        return;
    }
    if let Some(mut stream) = stream {
        loop {
            match stream.next(&mut ctx) {
                Ok(Some(chunk)) => {
                    if sink.send(chunk).await.is_err() {
                        break; // the client went away
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    log_warn("streaming a response", &format!("{e:?}"));
                    break;
                }
            }
        }
    }
    let _ = sink.close().await;
}

async fn run(
    incoming: IncomingRequest,
    route: impl FnOnce(&mut Ctx, &HttpRequest) -> Result<Served, ApiError>,
) -> (Response, Ctx, Option<Box<dyn BodyStream>>) {
    let started = Instant::now();
    let id = request_id(
        incoming
            .headers()
            .get("x-request-id")
            .first()
            .and_then(|v| std::str::from_utf8(v).ok()),
    );
    let path = incoming.path_with_query().unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default().to_string();
    let method = incoming.method();
    let mut ctx = Ctx::new(id.clone());
    let mut stream = None;
    let outcome = match HttpRequest::read(incoming).await {
        Err(e) => Err((e, Vec::new())),
        Ok(req) => {
            let cors = cors_headers(&req);
            if is_preflight(&req) {
                Ok((preflight(&cors), cors))
            } else {
                let result = ctx.count_request(&req).and_then(|()| route(&mut ctx, &req));
                match result {
                    Ok(Served::Reply(reply)) => Ok((reply, cors)),
                    Ok(Served::Stream(s)) => {
                        let reply = Reply::no_content()
                            .status(200)
                            .header("content-type", s.content_type())
                            .header("cache-control", "no-store")
                            // Proxies must pass events on as they come.
                            .header("x-accel-buffering", "no");
                        stream = Some(s);
                        Ok((reply, cors))
                    }
                    Err(e) => Err((e, cors)),
                }
            }
        }
    };
    let extra: Vec<(String, String)> = ctx
        .rate
        .as_ref()
        .map(|d| {
            d.headers()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect()
        })
        .unwrap_or_default();
    let response = match outcome {
        Ok((mut reply, cors)) => {
            reply.headers.extend(extra);
            reply.headers.extend(cors);
            reply.into_response(&id)
        }
        Err((err, cors)) => {
            if let Some(cause) = err.cause() {
                crate::log_line(&json!({"level": "warn", "msg": "request failed",
                    "request_id": id, "path": path, "error": cause}));
            }
            let mut res = problem(&err, &path, &id);
            for (k, v) in extra.into_iter().chain(cors) {
                res.set_header(k, v);
            }
            res
        }
    };
    let status = *response.status();
    crate::log_line(&json!({
        "level": "info",
        "msg": "request",
        "request_id": id,
        "project_id": ctx.logged_project,
        "run_id": ctx.logged_run,
        "method": format!("{method:?}"),
        "path": path,
        "status": status,
        "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
    }));
    (response, ctx, stream)
}

fn preflight(cors: &[(String, String)]) -> Reply {
    let mut reply = Reply::no_content();
    if !cors.is_empty() {
        reply = reply
            .header(
                "access-control-allow-methods",
                "GET, POST, PUT, PATCH, DELETE, OPTIONS",
            )
            .header(
                "access-control-allow-headers",
                "authorization, content-type, x-api-key, idempotency-key, if-match, x-request-id",
            )
            .header("access-control-max-age", "600");
    }
    reply
}

/// The values of the project's secrets named in `names` (missing ones are absent), opened
/// with the master keys. Values live only in memory for the call that needs them.
pub fn project_secrets(
    ctx: &mut Work,
    project_id: &str,
    names: &[String],
) -> Result<std::collections::HashMap<String, String>, ApiError> {
    if names.is_empty() {
        return Ok(Default::default());
    }
    project_secrets_and_prefixed(ctx, project_id, names, None)
}

/// A sealed value read from columns `at` (ciphertext), `at + 1` (nonce) and `at + 2` (key
/// id) of `row`.
pub fn sealed_at(
    row: &core_db::Row,
    at: usize,
) -> Result<sparkops_core::secrets::Sealed, ApiError> {
    let (Some(V::Bytes(ciphertext)), Some(V::Bytes(nonce))) = (row.0.get(at), row.0.get(at + 1))
    else {
        return Err(ApiError::internal("a sealed secret's row is malformed"));
    };
    Ok(sparkops_core::secrets::Sealed {
        ciphertext: ciphertext.clone(),
        nonce: nonce
            .as_slice()
            .try_into()
            .map_err(|_| ApiError::internal("a sealed secret's nonce is malformed"))?,
        key_id: row.text(at + 2)?,
    })
}

/// As [`project_secrets`], with every secret whose name starts with `prefix` too, in the
/// same query.
pub fn project_secrets_and_prefixed(
    ctx: &mut Work,
    project_id: &str,
    names: &[String],
    prefix: Option<&str>,
) -> Result<std::collections::HashMap<String, String>, ApiError> {
    let keys = master_keys()?;
    let rows = ctx.db()?.query(
        "select name, ciphertext, nonce, key_id from project_secrets
         where project_id = $1
           and (name = any(string_to_array($2, ',')) or starts_with(name, $3))",
        &[
            V::Uuid(project_id.into()),
            V::Text(names.join(",")),
            prefix.map_or(V::Null, |p| V::Text(p.into())),
        ],
    )?;
    let mut out = std::collections::HashMap::new();
    for row in rows {
        let name = row.text(0)?;
        let sealed = sealed_at(&row, 1)?;
        let value = keys
            .open(project_id, &name, &sealed)
            .map_err(|e| ApiError::Internal(format!("secret {name} cannot be opened: {e:?}")))?;
        out.insert(name, value);
    }
    Ok(out)
}
