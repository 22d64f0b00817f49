//! Projects (soft-deleted) and their members; the last owner can neither leave nor be
//! demoted.
// `#[http_component]` expands to the ABI export glue, which is `unsafe` by nature.
#![allow(unsafe_code)]

use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Tx, Value as V, utc};
use sparkops_core::error::ApiError;
use sparkops_core::ids::parse_uuid;
use sparkops_core::input::{Body, Email, Slug};
use sparkops_core::patch::IfMatch;
use sparkops_core::roles::{Action, Role};
use sparkops_core::time::rfc3339;
use sparkops_core::tool::check_secret_name;
use sparkops_platform::db::Db;
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::{self, Ctx, Principal, ProjectAccess};
use sparkops_platform::random_array;
use sparkops_platform::resource;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    pipeline::serve(req, route).await
}

fn route(ctx: &mut Ctx, req: &HttpRequest) -> Result<Reply, ApiError> {
    let segments = req.segments("/api/v1/projects").unwrap_or_default();
    let who = ctx.authenticate(req)?;
    match (&req.method, segments.as_slice()) {
        (Method::Get, []) => list(ctx, req, &who),
        (Method::Post, []) => create(ctx, req, &who),
        (Method::Get, [id]) => get(ctx, &who, id),
        (Method::Patch, [id]) => update(ctx, req, &who, id),
        (Method::Delete, [id]) => delete(ctx, &who, id),
        (Method::Get, [id, "members"]) => list_members(ctx, &who, id),
        (Method::Post, [id, "members"]) => add_member(ctx, req, &who, id),
        (Method::Patch, [id, "members", user]) => change_role(ctx, req, &who, id, user),
        (Method::Delete, [id, "members", user]) => remove_member(ctx, &who, id, user),
        (Method::Get, [id, "secrets"]) => list_secrets(ctx, &who, id),
        (Method::Put, [id, "secrets", name]) => put_secret(ctx, req, &who, id, name),
        (Method::Delete, [id, "secrets", name]) => delete_secret(ctx, &who, id, name),
        (_, []) => Err(ApiError::MethodNotAllowed {
            allow: vec!["GET", "POST"],
        }),
        (_, [_]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["GET", "PATCH", "DELETE"],
        }),
        (_, [_, "members"]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["GET", "POST"],
        }),
        (_, [_, "members", _]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["PATCH", "DELETE"],
        }),
        (_, [_, "secrets"]) => Err(ApiError::MethodNotAllowed { allow: vec!["GET"] }),
        (_, [_, "secrets", _]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["PUT", "DELETE"],
        }),
        _ => Err(ApiError::NotFound(format!("no route {}", req.path))),
    }
}

const PROJECT_COLUMNS: &str = "p.project_id::text, p.name, p.slug, p.description, p.version, \
     (p.created_at at time zone 'UTC'), (p.updated_at at time zone 'UTC'), p.trace_endpoint";

fn project_json(row: &Row, role: Option<&str>) -> Result<Value, ApiError> {
    let mut v = json!({
        "id": row.text(0)?,
        "name": row.text(1)?,
        "slug": row.text(2)?,
        "description": row.text(3).ok(),
        "version": row.int(4)?,
        "created_at": rfc3339(row.timestamp(5)?),
        "updated_at": rfc3339(row.timestamp(6)?),
        "trace_endpoint": row.opt_text(7)?,
    });
    if let Some(role) = role {
        v["role"] = json!(role);
    }
    Ok(v)
}

fn list(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    let page = req.page()?;
    let only = who
        .api_key
        .as_ref()
        .map(|k| V::Uuid(k.project_id.clone()))
        .unwrap_or(V::Null);
    let rows = ctx.db()?.query(
        &format!(
            "select {PROJECT_COLUMNS}, m.role from projects p
             join memberships m on m.project_id = p.project_id and m.user_id = $1
             where p.deleted_at is null
               and ($2::uuid is null or p.project_id < $2::uuid)
               and ($3::uuid is null or p.project_id = $3::uuid)
             order by p.project_id desc limit $4"
        ),
        &[
            V::Uuid(who.user_id.clone()),
            page.before.clone().map(V::Uuid).unwrap_or(V::Null),
            only,
            V::Int64(page.limit + 1),
        ],
    )?;
    resource::page_reply(&page, &rows, |r| project_json(r, r.text(8).ok().as_deref()))
}

/// Reads `name`, `slug`, `description` and `trace_endpoint` for a create (`required`) or a
/// merge patch.
struct ProjectFields {
    name: Option<String>,
    slug: Option<Slug>,
    /// `Some(None)` clears it.
    description: Option<Option<String>>,
    /// Where finished runs' traces go (OTLP/HTTP JSON); `Some(None)` stops the export.
    trace_endpoint: Option<Option<String>>,
}

fn read_fields(body: &mut Body, required: bool) -> ProjectFields {
    let name = if required {
        body.str("name", 200)
    } else {
        body.opt_str("name", 200)
    };
    let slug = body
        .opt_str("slug", 64)
        .and_then(|s| match Slug::parse(&s) {
            Ok(slug) => Some(slug),
            Err(msg) => {
                body.error("slug", msg);
                None
            }
        });
    let had_description = body.has("description");
    let description = body.opt_str("description", 2000);
    let description = if had_description {
        Some(description)
    } else {
        None
    };
    let had_endpoint = body.has("trace_endpoint");
    let endpoint = body.opt_str("trace_endpoint", 2000).and_then(|raw| {
        match sparkops_platform::outbound::check_user_url(&raw) {
            Ok(url) => Some(url.to_string()),
            Err(e) => {
                body.error("trace_endpoint", e);
                None
            }
        }
    });
    ProjectFields {
        name,
        slug,
        description,
        trace_endpoint: had_endpoint.then_some(endpoint),
    }
}

fn slug_taken(e: sparkops_core::db::DbError) -> ApiError {
    if e.is_unique_violation("projects_owner_slug_key") {
        ApiError::Conflict("you already have a project with this slug".into())
    } else {
        e.into()
    }
}

fn create(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    if who.api_key.is_some() {
        return Err(ApiError::Forbidden(
            "API keys cannot create projects".into(),
        ));
    }
    let mut body = Body::parse(&req.body)?;
    let fields = read_fields(&mut body, true);
    body.finish()?;
    let name = fields.name.ok_or_else(ApiError::unchecked_field)?;
    let slug = fields.slug.unwrap_or_else(|| Slug::from_name(&name));
    ctx.create_once(req, who, |tx, ctx| {
        let id = ctx.new_id();
        let rows = tx
            .query(
                &format!(
                    "insert into projects (project_id, owner_id, name, slug, description, trace_endpoint, created_at, updated_at)
                     values ($1, $2, $3, $4, $5, $7, $6{AS_TIMESTAMPTZ}, $6{AS_TIMESTAMPTZ})
                     returning project_id::text, name, slug, description, version, {}, {}, trace_endpoint",
                    utc("created_at"),
                    utc("updated_at")
                ),
                &[
                    V::Uuid(id.clone()),
                    V::Uuid(who.user_id.clone()),
                    V::Text(name),
                    V::Text(slug.as_str().to_string()),
                    fields.description.flatten().map(V::Text).unwrap_or(V::Null),
                    V::Timestamp(ctx.now),
                    fields.trace_endpoint.clone().flatten().map(V::Text).unwrap_or(V::Null),
                ],
            )
            .map_err(slug_taken)?;
        tx.execute(
            "insert into memberships (project_id, user_id, role) values ($1, $2, 'owner')",
            &[V::Uuid(id.clone()), V::Uuid(who.user_id.clone())],
        )?;
        Ok(Reply::created(project_json(&rows[0], Some("owner"))?, format!("/api/v1/projects/{id}")))
    })
}

fn load(ctx: &mut Ctx, access: &ProjectAccess) -> Result<Row, ApiError> {
    let rows = ctx.db()?.query(
        &format!("select {PROJECT_COLUMNS} from projects p where p.project_id = $1 and p.deleted_at is null"),
        &[V::Uuid(access.project_id.clone())],
    )?;
    rows.into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound(format!("no project {}", access.project_id)))
}

fn get(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let access = ctx.project(who, id, Action::Read)?;
    let row = load(ctx, &access)?;
    Ok(Reply::ok(project_json(&row, Some(access.role.as_str()))?))
}

fn update(ctx: &mut Ctx, req: &HttpRequest, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let access = ctx.project(who, id, Action::Administer)?;
    let mut body = Body::parse(&req.body)?;
    let fields = read_fields(&mut body, false);
    body.finish()?;
    let expected = resource::if_match(req)?;
    let row = ctx.transaction(|tx, ctx| {
        let rows = tx
            .query(
                &format!(
                    "update projects set
                        name = coalesce($2, name),
                        slug = coalesce($3, slug),
                        description = case when $4 then $5 else description end,
                        trace_endpoint = case when $8 then $9 else trace_endpoint end,
                        version = version + 1,
                        updated_at = $6{AS_TIMESTAMPTZ}
                     where project_id = $1 and deleted_at is null
                       and ($7::text is null or version = any(string_to_array($7::text, ',')::int8[]))
                     returning project_id::text, name, slug, description, version, {}, {}, trace_endpoint",
                    utc("created_at"),
                    utc("updated_at")
                ),
                &[
                    V::Uuid(access.project_id.clone()),
                    fields.name.clone().map(V::Text).unwrap_or(V::Null),
                    fields.slug.as_ref().map(|s| V::Text(s.as_str().into())).unwrap_or(V::Null),
                    V::Bool(fields.description.is_some()),
                    fields.description.clone().flatten().map(V::Text).unwrap_or(V::Null),
                    V::Timestamp(ctx.now),
                    if_match_versions(&expected),
                    V::Bool(fields.trace_endpoint.is_some()),
                    fields.trace_endpoint.clone().flatten().map(V::Text).unwrap_or(V::Null),
                ],
            )
            .map_err(slug_taken)?;
        rows.into_iter().next().ok_or_else(|| {
            ApiError::PreconditionFailed(
                "the project's version is not one If-Match names (weak tags never match)".into(),
            )
        })
    })?;
    let version = row.int(4)?;
    Ok(Reply::ok(project_json(&row, Some(access.role.as_str()))?)
        .header("etag", format!("\"{version}\"")))
}

/// The versions `If-Match` accepts, as the comma-separated text the update compares with;
/// `NULL` when any version will do.
fn if_match_versions(expected: &Option<IfMatch>) -> V {
    match expected {
        None | Some(IfMatch::Any) => V::Null,
        Some(IfMatch::Tags(versions)) => V::Text(
            versions
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(","),
        ),
    }
}

fn delete(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let access = ctx.project(who, id, Action::DeleteProject)?;
    // Runs arrive with the run engine; cancelling them joins this transaction then.
    ctx.db()?.execute(
        "update projects set deleted_at = now(), updated_at = now() where project_id = $1 and deleted_at is null",
        &[V::Uuid(access.project_id)],
    )?;
    Ok(Reply::no_content())
}

// ---- Members -------------------------------------------------------------------------------

fn member_json(row: &Row) -> Result<Value, ApiError> {
    Ok(json!({
        "user_id": row.text(0)?,
        "email": row.text(1)?,
        "name": row.text(2)?,
        "role": row.text(3)?,
        "created_at": rfc3339(row.timestamp(4)?),
    }))
}

const MEMBER_SELECT: &str = "select u.user_id::text, u.email, u.name, m.role, (m.created_at at time zone 'UTC') \
     from memberships m join users u on u.user_id = m.user_id";

fn list_members(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let access = ctx.project(who, id, Action::Read)?;
    let rows = ctx.db()?.query(
        &format!("{MEMBER_SELECT} where m.project_id = $1 order by m.created_at, u.user_id"),
        &[V::Uuid(access.project_id)],
    )?;
    let items = rows
        .iter()
        .map(member_json)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Reply::ok(json!({"items": items, "next_cursor": null})))
}

/// Only an owner may grant, change or take away the owner role.
fn check_grant(access: &ProjectAccess, role: Role) -> Result<(), ApiError> {
    if role == Role::Owner && access.role != Role::Owner {
        return Err(ApiError::Forbidden(
            "only an owner can make or unmake owners".into(),
        ));
    }
    Ok(())
}

/// Locks the project row so membership changes of one project happen one at a time (the
/// last-owner rule holds under concurrent requests), then counts its owners.
fn lock_and_count_owners(tx: &Tx<'_, Db>, project_id: &str) -> Result<i64, ApiError> {
    tx.query(
        "select project_id from projects where project_id = $1 for update",
        &[V::Uuid(project_id.into())],
    )?;
    let rows = tx.query(
        "select count(*) from memberships where project_id = $1 and role = 'owner'",
        &[V::Uuid(project_id.into())],
    )?;
    Ok(rows[0].int(0)?)
}

fn member_role(tx: &Tx<'_, Db>, project_id: &str, user_id: &str) -> Result<Option<Role>, ApiError> {
    let rows = tx.query(
        "select role from memberships where project_id = $1 and user_id = $2",
        &[V::Uuid(project_id.into()), V::Uuid(user_id.into())],
    )?;
    Ok(rows
        .first()
        .and_then(|r| r.text(0).ok())
        .and_then(|r| Role::parse(&r)))
}

fn add_member(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    id: &str,
) -> Result<Reply, ApiError> {
    let access = ctx.project(who, id, Action::Administer)?;
    let mut body = Body::parse(&req.body)?;
    let email: Option<Email> = body.email("email");
    let role = body.role("role");
    body.finish()?;
    let (Some(email), Some(role)) = (email, role) else {
        return Err(ApiError::unchecked_field());
    };
    check_grant(&access, role)?;
    ctx.create_once(req, who, |tx, _| {
        let users = tx.query("select user_id::text from users where lower(email) = $1", &[V::Text(email.as_str().into())])?;
        let user_id = users
            .first()
            .map(|r| r.text(0))
            .transpose()?
            .ok_or_else(|| ApiError::field("email", "no account has this email; ask them to register first"))?;
        let inserted = tx.execute(
            "insert into memberships (project_id, user_id, role) values ($1, $2, $3) on conflict do nothing",
            &[V::Uuid(access.project_id.clone()), V::Uuid(user_id.clone()), V::Text(role.as_str().into())],
        )?;
        if inserted == 0 {
            return Err(ApiError::Conflict("this user is already a member".into()));
        }
        let rows = tx.query(
            &format!("{MEMBER_SELECT} where m.project_id = $1 and m.user_id = $2"),
            &[V::Uuid(access.project_id.clone()), V::Uuid(user_id.clone())],
        )?;
        Ok(Reply::created(
            member_json(&rows[0])?,
            format!("/api/v1/projects/{}/members/{user_id}", access.project_id),
        ))
    })
}

fn change_role(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    id: &str,
    user: &str,
) -> Result<Reply, ApiError> {
    let access = ctx.project(who, id, Action::Administer)?;
    let user = parse_uuid(user, "member")?;
    let mut body = Body::parse(&req.body)?;
    let role = body.role("role");
    body.finish()?;
    let role = role.ok_or_else(ApiError::unchecked_field)?;
    check_grant(&access, role)?;
    let row = ctx.transaction(|tx, _| {
        let owners = lock_and_count_owners(tx, &access.project_id)?;
        let current = member_role(tx, &access.project_id, &user)?
            .ok_or_else(|| ApiError::NotFound(format!("no member {user}")))?;
        check_grant(&access, current)?;
        if current == Role::Owner && role != Role::Owner && owners <= 1 {
            return Err(ApiError::Conflict("the last owner cannot be demoted; make another owner first".into()));
        }
        tx.execute(
            "update memberships set role = $3, updated_at = now() where project_id = $1 and user_id = $2",
            &[V::Uuid(access.project_id.clone()), V::Uuid(user.clone()), V::Text(role.as_str().into())],
        )?;
        let rows = tx.query(
            &format!("{MEMBER_SELECT} where m.project_id = $1 and m.user_id = $2"),
            &[V::Uuid(access.project_id.clone()), V::Uuid(user.clone())],
        )?;
        rows.into_iter()
            .next()
            .ok_or_else(|| ApiError::internal("the member just changed is gone"))
    })?;
    Ok(Reply::ok(member_json(&row)?))
}

fn remove_member(ctx: &mut Ctx, who: &Principal, id: &str, user: &str) -> Result<Reply, ApiError> {
    let user = parse_uuid(user, "member")?;
    // Anyone may leave; removing someone else takes an admin.
    let leaving = who.api_key.is_none() && who.user_id == user;
    let access = ctx.project(
        who,
        id,
        if leaving {
            Action::Read
        } else {
            Action::Administer
        },
    )?;
    ctx.transaction(|tx, _| {
        let owners = lock_and_count_owners(tx, &access.project_id)?;
        let current = member_role(tx, &access.project_id, &user)?
            .ok_or_else(|| ApiError::NotFound(format!("no member {user}")))?;
        if !leaving {
            check_grant(&access, current)?;
        }
        if current == Role::Owner && owners <= 1 {
            return Err(ApiError::Conflict(
                "the last owner cannot leave; make another owner first".into(),
            ));
        }
        tx.execute(
            "delete from memberships where project_id = $1 and user_id = $2",
            &[V::Uuid(access.project_id.clone()), V::Uuid(user.clone())],
        )?;
        Ok(())
    })?;
    Ok(Reply::no_content())
}

// ---- Secrets ---------------------------------------------------------------------------------

/// The largest secret value, in bytes.
const MAX_SECRET_BYTES: usize = 64 * 1024;

/// Names, versions and times: no route ever answers a value. Members see the names, since
/// they write the tools that reference them.
fn list_secrets(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let access = ctx.project(who, id, Action::Write)?;
    let rows = ctx.db()?.query(
        &format!(
            "select name, version, {}, {} from project_secrets where project_id = $1 order by name",
            utc("created_at"),
            utc("updated_at")
        ),
        &[V::Uuid(access.project_id)],
    )?;
    let items = rows
        .iter()
        .map(|r| {
            Ok(json!({
                "name": r.text(0)?,
                "version": r.int(1)?,
                "created_at": rfc3339(r.timestamp(2)?),
                "updated_at": rfc3339(r.timestamp(3)?),
            }))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(Reply::ok(json!({"items": items, "next_cursor": null})))
}

/// `PUT /projects/{id}/secrets/{name} {value}`: seals the value (AES-256-GCM, a fresh nonce,
/// bound to the project and the name) and stores it, replacing any earlier one.
fn put_secret(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    id: &str,
    name: &str,
) -> Result<Reply, ApiError> {
    let access = ctx.project(who, id, Action::Administer)?;
    let mut body = Body::parse(&req.body)?;
    if let Err(m) = check_secret_name(name) {
        body.error("name", m);
    }
    // Not `str`: its messages never echo the value, but its length cap is for names.
    let value = match body.opt_value("value") {
        Some(Value::String(v)) if !v.is_empty() && v.len() <= MAX_SECRET_BYTES => Some(v),
        _ => {
            body.error(
                "value",
                format!("must be a string of 1 to {MAX_SECRET_BYTES} bytes"),
            );
            None
        }
    };
    body.finish()?;
    let value = value.ok_or_else(ApiError::unchecked_field)?;
    let keys = pipeline::master_keys()?;
    let sealed = keys.seal(&access.project_id, name, &value, random_array());
    ctx.transaction(|tx, ctx| {
        tx.execute(
            &format!(
                "insert into project_secrets (project_id, name, ciphertext, nonce, key_id, created_at, updated_at)
                 values ($1, $2, $3, $4, $5, $6{AS_TIMESTAMPTZ}, $6{AS_TIMESTAMPTZ})
                 on conflict (project_id, name) do update set
                    ciphertext = excluded.ciphertext, nonce = excluded.nonce, key_id = excluded.key_id,
                    version = project_secrets.version + 1, updated_at = excluded.updated_at"
            ),
            &[
                V::Uuid(access.project_id.clone()),
                V::Text(name.into()),
                V::Bytes(sealed.ciphertext.clone()),
                V::Bytes(sealed.nonce.to_vec()),
                V::Text(sealed.key_id.clone()),
                V::Timestamp(ctx.now),
            ],
        )?;
        Ok(())
    })?;
    Ok(Reply::no_content())
}

fn delete_secret(ctx: &mut Ctx, who: &Principal, id: &str, name: &str) -> Result<Reply, ApiError> {
    let access = ctx.project(who, id, Action::Administer)?;
    let removed = ctx.db()?.execute(
        "delete from project_secrets where project_id = $1 and name = $2",
        &[V::Uuid(access.project_id), V::Text(name.into())],
    )?;
    if removed == 0 {
        return Err(ApiError::NotFound(format!("no secret {name}")));
    }
    Ok(Reply::no_content())
}
