//! Accounts and credentials: register, login (JSON or OAuth2 password form), refresh with
//! rotation and reuse detection, logout, me; and project API keys.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use sparkops_core::auth::{self, ACCESS_TTL_SECS, REFRESH_TTL_SECS};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Tx, Value as V, utc};
use sparkops_core::error::ApiError;
use sparkops_core::input::{Body, check_password};
use sparkops_core::ratelimit::Limit;
use sparkops_core::roles::Action;
use sparkops_core::time::rfc3339;
use sparkops_platform::db::Db;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx, Work, token_key};
use sparkops_platform::random_array;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let segments = req.segments("/api/v1").unwrap_or_default();
    match (&req.method, segments.as_slice()) {
        (Method::Post, ["auth", "register"]) => register(ctx, req),
        (Method::Post, ["auth", "login"]) => login(ctx, req),
        (Method::Post, ["auth", "refresh"]) => refresh(ctx, req),
        (Method::Post, ["auth", "logout"]) => logout(ctx, req),
        (Method::Get, ["auth", "me"]) => me(ctx, req),
        (Method::Get, ["api-keys"]) => list_keys(ctx, req),
        (Method::Post, ["api-keys"]) => create_key(ctx, req),
        (Method::Delete, ["api-keys", id]) => revoke_key(ctx, req, id),
        (_, ["auth", "register" | "login" | "refresh" | "logout"]) => {
            Err(ApiError::MethodNotAllowed {
                allow: vec!["POST"],
            })
        }
        (_, ["auth", "me"]) => Err(ApiError::MethodNotAllowed { allow: vec!["GET"] }),
        (_, ["api-keys"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["GET", "POST"],
        }),
        (_, ["api-keys", _]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["DELETE"],
        }),
        _ => Err(ApiError::NotFound(format!("no route {}", req.path))),
    }
}

const USER_COLUMNS: &str = "user_id::text, email, name";

fn user_json(row: &Row, created_at: chrono::DateTime<chrono::Utc>) -> Result<Value, ApiError> {
    Ok(json!({
        "id": row.text(0)?,
        "email": row.text(1)?,
        "name": row.text(2)?,
        "created_at": rfc3339(created_at),
    }))
}

/// A new refresh token in `family_id`, stored as its hash.
fn new_refresh_token(tx: &Tx<'_, Db>, family_id: &str, ctx: &Work) -> Result<String, ApiError> {
    let token = auth::refresh_token(&random_array::<32>());
    let expires = ctx.now + chrono::Duration::seconds(REFRESH_TTL_SECS);
    tx.execute(
        &format!(
            "insert into refresh_tokens (token_hash, family_id, expires_at) values ($1, $2, $3{AS_TIMESTAMPTZ})"
        ),
        &[V::Text(auth::token_hash(&token)), V::Uuid(family_id.to_string()), V::Timestamp(expires)],
    )?;
    Ok(token)
}

/// Starts a session (a refresh-token family) and answers with both tokens.
fn start_session(tx: &Tx<'_, Db>, ctx: &Work, user_id: &str) -> Result<Value, ApiError> {
    let family_id = ctx.new_id();
    tx.execute(
        "insert into refresh_token_families (family_id, user_id) values ($1, $2)",
        &[V::Uuid(family_id.clone()), V::Uuid(user_id.to_string())],
    )?;
    let refresh_token = new_refresh_token(tx, &family_id, ctx)?;
    tokens(ctx, user_id, refresh_token)
}

fn tokens(ctx: &Work, user_id: &str, refresh_token: String) -> Result<Value, ApiError> {
    let access = token_key()?.issue(user_id, &ctx.new_id(), ctx.now.timestamp() as u64);
    Ok(json!({
        "access_token": access,
        "refresh_token": refresh_token,
        "token_type": "bearer",
        "expires_in": ACCESS_TTL_SECS,
    }))
}

fn register(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let mut body = Body::parse(&req.body)?;
    let email = body.email("email");
    let password = body.str("password", 1024);
    if let Some(Err(msg)) = password.as_deref().map(check_password) {
        body.error("password", msg);
    }
    let name = body.str("name", 200);
    body.finish()?;
    let (Some(email), Some(password), Some(name)) = (email, password, name) else {
        return Err(ApiError::unchecked_field());
    };

    let password_hash = auth::hash_password(&password, &random_array::<16>());
    let out = ctx.transaction(|tx, ctx| {
        let user_id = ctx.new_id();
        let rows = tx
            .query(
                &format!(
                    "insert into users (user_id, email, name, password_hash, created_at, updated_at)
                     values ($1, $2, $3, $4, $5{AS_TIMESTAMPTZ}, $5{AS_TIMESTAMPTZ})
                     returning {USER_COLUMNS}"
                ),
                &[
                    V::Uuid(user_id.clone()),
                    V::Text(email.as_str().to_string()),
                    V::Text(name),
                    V::Text(password_hash),
                    V::Timestamp(ctx.now),
                ],
            )
            .map_err(|e| {
                if e.is_unique_violation("users_email_key") {
                    ApiError::Conflict("an account with this email already exists".into())
                } else {
                    e.into()
                }
            })?;
        let mut out = start_session(tx, ctx, &user_id)?;
        out["user"] = user_json(&rows[0], ctx.now)?;
        Ok(out)
    })?;
    Ok(Reply::created(out, "/api/v1/auth/me".into()))
}

/// Failed logins allowed per account and per client IP in [`LOGIN_WINDOW_SECS`].
const LOGIN_WINDOW_SECS: u64 = 15 * 60;

fn login(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let form = req
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    let mut body = if form {
        Body::from_form(&req.body)?
    } else {
        Body::parse(&req.body)?
    };
    let email_field = if form { "username" } else { "email" };
    let email = body.str(email_field, 254);
    let password = body.str("password", 1024);
    if form {
        // The OAuth2 password flow's other fields; only `grant_type=password` is served.
        if let Some(grant) = body.opt_str("grant_type", 64)
            && grant != "password"
        {
            body.error("grant_type", "must be \"password\"");
        }
        for ignored in ["scope", "client_id", "client_secret"] {
            let _ = body.opt_str(ignored, 1024);
        }
    }
    body.finish()?;
    let (Some(email), Some(password)) = (email, password) else {
        return Err(ApiError::unchecked_field());
    };
    let email = email.trim().to_lowercase();

    let account_key = format!("login:acct:{}", auth::token_hash(&email));
    let ip_key = format!("login:ip:{}", req.client_ip());
    let per_account = Limit {
        limit: sparkops_platform::settings().login_failures_per_account,
        window_secs: LOGIN_WINDOW_SECS,
    };
    let per_ip = Limit {
        limit: sparkops_platform::settings().login_failures_per_ip,
        window_secs: LOGIN_WINDOW_SECS,
    };
    for (key, limit) in [(&account_key, per_account), (&ip_key, per_ip)] {
        if let Ok((failures, ttl)) = sparkops_platform::ratelimit::peek(key)
            && failures >= limit.limit
        {
            return Err(ApiError::RateLimited {
                retry_after_secs: ttl.max(1) as u64,
            });
        }
    }

    let rows = ctx.db()?.query(
        "select user_id::text, password_hash from users where lower(email) = $1",
        &[V::Text(email)],
    )?;
    let (user_id, hash) = match rows.first() {
        Some(r) => (Some(r.text(0)?), r.text(1)?),
        None => (None, auth::DUMMY_PASSWORD_HASH.to_string()),
    };
    // The hash is checked even for an unknown email, so both cost the same.
    let verified = auth::verify_password(&password, &hash);
    let Some(user_id) = user_id.filter(|_| verified) else {
        for (key, limit) in [(&account_key, per_account), (&ip_key, per_ip)] {
            let _ = sparkops_platform::ratelimit::count(key, limit.window_secs);
        }
        return Err(ApiError::Unauthenticated(
            "invalid email or password".into(),
        ));
    };
    let _ = sparkops_platform::ratelimit::clear(&account_key);
    let out = ctx.transaction(|tx, ctx| start_session(tx, ctx, &user_id))?;
    Ok(Reply::ok(out))
}

/// What a refresh found, decided inside the transaction and acted on after it commits.
enum Refresh {
    Rotated(Value),
    /// A rotated token came back: its family is now revoked.
    Reused,
    Invalid,
}

fn refresh(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let mut body = Body::parse(&req.body)?;
    let token = body.str("refresh_token", 200);
    body.finish()?;
    let hash = auth::token_hash(&token.unwrap_or_default());
    let outcome = ctx.transaction(|tx, ctx| {
        // `for update` serialises concurrent refreshes of one token: only one rotates it.
        let rows = tx.query(
            &format!(
                "select t.family_id::text, t.rotated_at is not null, f.revoked_at is not null,
                        t.expires_at < $2{AS_TIMESTAMPTZ}, f.user_id::text
                 from refresh_tokens t join refresh_token_families f using (family_id)
                 where t.token_hash = $1
                 for update of t, f"
            ),
            &[V::Text(hash.clone()), V::Timestamp(ctx.now)],
        )?;
        let Some(row) = rows.first() else {
            return Ok(Refresh::Invalid);
        };
        let family_id = row.text(0)?;
        let flag = |i| matches!(row.0.get(i), Some(V::Bool(true)));
        if flag(2) || flag(3) {
            return Ok(Refresh::Invalid);
        }
        if flag(1) {
            tx.execute(
                "update refresh_token_families set revoked_at = now(), revoked_reason = 'reuse'
                 where family_id = $1",
                &[V::Uuid(family_id)],
            )?;
            return Ok(Refresh::Reused);
        }
        tx.execute(
            "update refresh_tokens set rotated_at = now() where token_hash = $1",
            &[V::Text(hash.clone())],
        )?;
        let next = new_refresh_token(tx, &family_id, ctx)?;
        Ok(Refresh::Rotated(tokens(ctx, &row.text(4)?, next)?))
    })?;
    match outcome {
        Refresh::Rotated(out) => Ok(Reply::ok(out)),
        Refresh::Reused => Err(ApiError::Unauthenticated(
            "this refresh token was already used; the session has been revoked".into(),
        )),
        Refresh::Invalid => Err(ApiError::Unauthenticated(
            "the refresh token is invalid or expired".into(),
        )),
    }
}

fn logout(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let mut body = Body::parse(&req.body)?;
    let token = body.str("refresh_token", 200);
    body.finish()?;
    let hash = auth::token_hash(&token.unwrap_or_default());
    // Only the caller's own session is revoked; anything else is answered the same way.
    ctx.db()?.execute(
        "update refresh_token_families f set revoked_at = now(), revoked_reason = 'logout'
         from refresh_tokens t
         where t.family_id = f.family_id and t.token_hash = $1 and f.user_id = $2 and f.revoked_at is null",
        &[V::Text(hash), V::Uuid(who.user_id)],
    )?;
    Ok(Reply::no_content())
}

fn me(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let db = ctx.db()?;
    let rows = db.query(
        &format!(
            "select {USER_COLUMNS}, {} from users where user_id = $1",
            utc("created_at")
        ),
        &[V::Uuid(who.user_id.clone())],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::Unauthenticated("the account no longer exists".into()))?;
    let mut user = user_json(row, row.timestamp(3)?)?;
    let memberships = db.query(
        "select m.project_id::text, m.role from memberships m
         join projects p on p.project_id = m.project_id and p.deleted_at is null
         where m.user_id = $1 order by m.project_id desc",
        &[V::Uuid(who.user_id)],
    )?;
    let visible = |project_id: &str| {
        who.api_key
            .as_ref()
            .is_none_or(|k| k.project_id == project_id)
    };
    user["memberships"] = memberships
        .iter()
        .filter_map(|r| {
            let (project_id, role) = (r.text(0).ok()?, r.text(1).ok()?);
            visible(&project_id).then(|| json!({"project_id": project_id, "role": role}))
        })
        .collect();
    Ok(Reply::ok(user))
}

// ---- API keys -----------------------------------------------------------------------------

const KEY_COLUMNS: &str = "api_key_id::text, project_id::text, name, prefix, role";

fn key_json(row: &Row) -> Result<Value, ApiError> {
    Ok(json!({
        "id": row.text(0)?,
        "project_id": row.text(1)?,
        "name": row.text(2)?,
        "prefix": row.text(3)?,
        "role": row.text(4)?,
        "created_at": row.time_json(5)?,
        "expires_at": row.time_json(6)?,
        "revoked_at": row.time_json(7)?,
    }))
}

fn key_select() -> String {
    format!(
        "select {KEY_COLUMNS}, {}, {}, {} from api_keys",
        utc("created_at"),
        utc("expires_at"),
        utc("revoked_at")
    )
}

fn list_keys(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let project_id = req
        .query_param("project_id")
        .ok_or_else(|| ApiError::field("project_id", "is required"))?;
    let project = ctx.project(&who, &project_id, Action::Administer)?;
    let page = req.page()?;
    let rows = ctx.db()?.query(
        &format!(
            "{} where project_id = $1 and ($2::uuid is null or api_key_id < $2::uuid)
             order by api_key_id desc limit $3",
            key_select()
        ),
        &[
            V::Uuid(project.project_id),
            page.before.clone().map(V::Uuid).unwrap_or(V::Null),
            V::Int64(page.limit + 1),
        ],
    )?;
    sparkops_platform::resource::page_reply(&page, &rows, key_json)
}

fn create_key(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let mut body = Body::parse(&req.body)?;
    let name = body.str("name", 200);
    let project_id = body.str("project_id", 64);
    let role = body.role("role");
    let expires_at = body.opt_time("expires_at");
    if expires_at.is_some_and(|t| t <= ctx.now) {
        body.error("expires_at", "must be in the future");
    }
    body.finish()?;
    let (Some(name), Some(project_id), Some(role)) = (name, project_id, role) else {
        return Err(ApiError::unchecked_field());
    };
    let project = ctx.project(&who, &project_id, Action::Administer)?;
    if who.api_key.is_some() {
        return Err(ApiError::Forbidden(
            "API keys cannot create API keys".into(),
        ));
    }
    if role > project.role {
        return Err(ApiError::Forbidden(format!(
            "a {} cannot create a key with the {role} role",
            project.role
        )));
    }
    let key = auth::api_key(&random_array::<32>());
    ctx.create_once(req, &who, |tx, ctx| {
        let id = ctx.new_id();
        let rows = tx.query(
            &format!(
                "insert into api_keys (api_key_id, project_id, created_by, name, prefix, key_hash, role, expires_at, created_at)
                 values ($1, $2, $3, $4, $5, $6, $7, $8{AS_TIMESTAMPTZ}, $9{AS_TIMESTAMPTZ})
                 returning {KEY_COLUMNS}, {}, {}, {}",
                utc("created_at"),
                utc("expires_at"),
                utc("revoked_at")
            ),
            &[
                V::Uuid(id.clone()),
                V::Uuid(project.project_id.clone()),
                V::Uuid(who.user_id.clone()),
                V::Text(name),
                V::Text(key.prefix.clone()),
                V::Text(auth::token_hash(&key.secret)),
                V::Text(role.as_str().into()),
                expires_at.map(V::Timestamp).unwrap_or(V::Null),
                V::Timestamp(ctx.now),
            ],
        )?;
        let mut out = key_json(&rows[0])?;
        out["secret"] = json!(key.secret);
        Ok(Reply::created(out, format!("/api/v1/api-keys/{id}")))
    })
}

fn revoke_key(ctx: &mut Ctx, req: &HttpRequest, id: &str) -> Result<Reply, ApiError> {
    let who = ctx.authenticate(req)?;
    let not_found = || ApiError::NotFound(format!("no API key {id}"));
    let id = sparkops_core::ids::parse_uuid(id, "API key")?;
    let rows = ctx.db()?.query(
        "select project_id::text from api_keys where api_key_id = $1",
        &[V::Uuid(id.clone())],
    )?;
    let project_id = rows
        .first()
        .map(|r| r.text(0))
        .transpose()?
        .ok_or_else(not_found)?;
    // A key in a project the caller cannot see is as absent as a key that does not exist.
    let project = ctx
        .project(&who, &project_id, Action::Read)
        .map_err(|_| not_found())?;
    if !project.role.can(Action::Administer) {
        return Err(ApiError::Forbidden(format!(
            "the {} role cannot revoke API keys",
            project.role
        )));
    }
    ctx.db()?.execute(
        "update api_keys set revoked_at = coalesce(revoked_at, now()) where api_key_id = $1",
        &[V::Uuid(id)],
    )?;
    Ok(Reply::no_content())
}
