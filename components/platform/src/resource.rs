//! Project-scoped resources (agents, tools, workflows, policies, schedules): one
//! implementation of list, create, read, merge-patch update and soft delete for every area,
//! each reached only through the caller's membership of the resource's project.
//!
//! A resource says where its rows live and how one is shown ([`Resource::to_json`]), and
//! validates and writes a whole document ([`Resource::save`]). Create saves the body; update
//! loads the row under a lock, checks `If-Match`, merges the patch into the current writable
//! fields and saves the result, so both paths run the same validation.

use serde_json::{Map, Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Row, Tx, Value as V};
use sparkops_core::error::{ApiError, FieldError};
use sparkops_core::ids::parse_uuid;
use sparkops_core::page::PageRequest;
use sparkops_core::patch::IfMatch;
use sparkops_core::roles::Action;
use spin_sdk::http::Method;

use crate::db::Db;
use crate::http::{HttpRequest, Reply};
use crate::pipeline::{Ctx, Principal, ProjectAccess, Work};

/// How a list filter's query value is bound.
#[derive(Debug, Clone, Copy)]
pub enum FilterType {
    Uuid,
    Bool,
}

/// An equality filter of a list: `?<param>=` compares with `column`.
#[derive(Debug, Clone, Copy)]
pub struct Filter {
    pub param: &'static str,
    pub column: &'static str,
    pub kind: FilterType,
}

/// What [`Resource::save`] writes.
pub struct Write<'a> {
    pub project_id: &'a str,
    pub id: &'a str,
    /// The whole document: the create body, or the current fields with the patch merged in.
    pub doc: Value,
    /// True on create, false on update.
    pub created: bool,
    pub user_id: &'a str,
}

/// A project-scoped table with `project_id`, `version`, `deleted_at`, `created_at` and
/// `updated_at` columns.
pub trait Resource {
    /// Singular, for messages: `"agent"`.
    const NOUN: &'static str;
    /// The collection's path: `"/api/v1/agents"`.
    const PATH: &'static str;
    const TABLE: &'static str;
    /// The id column: `"agent_id"`.
    const ID: &'static str;
    /// The `from` clause, the resource's table aliased `r` (joins allowed).
    const FROM: &'static str;
    /// The select list; column 0 is the id as text.
    const COLUMNS: &'static str;
    /// The fields a create body or a merge patch may carry, besides `project_id` on create.
    const FIELDS: &'static [&'static str];
    /// The role needed to create, change or delete.
    const WRITE: Action = Action::Write;
    /// Equality filters of the list, besides `project_id`, `created_after`, `created_before`.
    const FILTERS: &'static [Filter] = &[];

    /// The resource as answered; carries `id`, `project_id`, `version` and the [`Self::FIELDS`].
    fn to_json(row: &Row) -> Result<Value, ApiError>;

    /// Validates `w.doc` whole and writes it as row `w.id` (insert on create, replace on
    /// update, `version` raised by one).
    fn save(tx: &Tx<'_, Db>, ctx: &Work, w: Write<'_>) -> Result<(), ApiError>;

    /// Fields shown once, in the reply to the create that made them (a generated secret):
    /// written by the resource in the create's transaction, added to the reply after it is
    /// stored for `Idempotency-Key` replays, so a replay never shows them.
    fn reveal_on_create(
        _tx: &Tx<'_, Db>,
        _project_id: &str,
        _id: &str,
    ) -> Result<Map<String, Value>, ApiError> {
        Ok(Map::new())
    }

    /// Why the live row `id` cannot be deleted (others still use it), if so.
    fn in_use(_tx: &Tx<'_, Db>, _id: &str) -> Result<Option<String>, ApiError> {
        Ok(None)
    }
}

/// Serves `GET|POST <PATH>` and `GET|PATCH|DELETE <PATH>/{id}`; `None` for other paths, so
/// a component can route its extra endpoints first or after.
pub fn serve<R: Resource>(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    segments: &[&str],
) -> Option<Result<Reply, ApiError>> {
    Some(match (&req.method, segments) {
        (Method::Get, []) => list::<R>(ctx, req, who),
        (Method::Post, []) => create::<R>(ctx, req, who),
        (Method::Get, [id]) => get::<R>(ctx, who, id),
        (Method::Patch, [id]) => update::<R>(ctx, req, who, id),
        (Method::Delete, [id]) => delete::<R>(ctx, who, id),
        (_, []) => Err(ApiError::MethodNotAllowed {
            allow: vec!["GET", "POST"],
        }),
        (_, [_]) => Err(ApiError::MethodNotAllowed {
            allow: vec!["GET", "PATCH", "DELETE"],
        }),
        _ => return None,
    })
}

/// [`serve`], with `404` for any other path of the area.
pub fn serve_or_404<R: Resource>(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    segments: &[&str],
) -> Result<Reply, ApiError> {
    serve::<R>(ctx, req, who, segments)
        .unwrap_or_else(|| Err(ApiError::NotFound(format!("no route {}", req.path))))
}

fn not_found<R: Resource>(id: &str) -> ApiError {
    ApiError::NotFound(format!("no {} {id}", R::NOUN))
}

/// The live resource `id` and its project, reached through the caller's membership with
/// `action`: `404` when the caller cannot see it, `403` when the role lacks the action.
pub fn access<R: Resource>(
    ctx: &mut Ctx,
    who: &Principal,
    id: &str,
    action: Action,
) -> Result<(String, ProjectAccess), ApiError> {
    let id = parse_uuid(id, R::NOUN)?;
    let rows = ctx.db()?.query(
        &format!(
            "select project_id::text from {} where {} = $1 and deleted_at is null",
            R::TABLE,
            R::ID
        ),
        &[V::Uuid(id.clone())],
    )?;
    let project_id = rows
        .first()
        .map(|r| r.text(0))
        .transpose()?
        .ok_or_else(|| not_found::<R>(&id))?;
    let access = ctx.project(who, &project_id, action).map_err(|e| match e {
        ApiError::NotFound(_) => not_found::<R>(&id),
        other => other,
    })?;
    Ok((id, access))
}

/// The project a collection request is about: `?project_id=` (or the body's), defaulting
/// to an API key's own project.
pub fn project_of_request(
    ctx: &mut Ctx,
    who: &Principal,
    project_id: Option<String>,
    action: Action,
) -> Result<ProjectAccess, ApiError> {
    let project_id = project_id
        .or_else(|| who.api_key.as_ref().map(|k| k.project_id.clone()))
        .ok_or_else(|| ApiError::field("project_id", "is required"))?;
    ctx.project(who, &project_id, action)
}

/// One row by id, live or not yet deleted, inside `tx` (`lock` takes a row lock).
fn select_one<R: Resource>(tx: &Tx<'_, Db>, id: &str, lock: bool) -> Result<Row, ApiError> {
    let rows = tx.query(
        &format!(
            "select {} from {} where r.{} = $1 and r.deleted_at is null{}",
            R::COLUMNS,
            R::FROM,
            R::ID,
            if lock { " for update of r" } else { "" }
        ),
        &[V::Uuid(id.to_string())],
    )?;
    rows.into_iter().next().ok_or_else(|| not_found::<R>(id))
}

/// `{"items": [...], "next_cursor": ...}` from `limit + 1` rows whose column 0 is the id.
pub fn page_reply(
    page: &PageRequest,
    rows: &[Row],
    to_json: impl Fn(&Row) -> Result<Value, ApiError>,
) -> Result<Reply, ApiError> {
    let ids: Vec<String> = rows.iter().map(|r| r.text(0)).collect::<Result<_, _>>()?;
    let (n, next_cursor) = page.finish(&ids);
    let items = rows[..n]
        .iter()
        .map(to_json)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Reply::ok(
        json!({"items": items, "next_cursor": next_cursor}),
    ))
}

fn list<R: Resource>(ctx: &mut Ctx, req: &HttpRequest, who: &Principal) -> Result<Reply, ApiError> {
    let access = project_of_request(ctx, who, req.query_param("project_id"), Action::Read)?;
    let page = req.page()?;
    let mut sql = format!(
        "select {} from {} where r.project_id = $1 and r.deleted_at is null
           and ($2::uuid is null or r.{} < $2::uuid)",
        R::COLUMNS,
        R::FROM,
        R::ID
    );
    let mut params = vec![
        V::Uuid(access.project_id),
        page.before.clone().map(V::Uuid).unwrap_or(V::Null),
    ];
    for (param, op) in [("created_after", ">"), ("created_before", "<")] {
        if let Some(raw) = req.query_param(param) {
            let t = sparkops_core::time::parse_rfc3339(&raw)
                .ok_or_else(|| ApiError::field(param, "must be an RFC 3339 time"))?;
            params.push(V::Timestamp(t));
            sql += &format!(" and r.created_at {op} ${}{AS_TIMESTAMPTZ}", params.len());
        }
    }
    for f in R::FILTERS {
        if let Some(raw) = req.query_param(f.param) {
            params.push(match f.kind {
                FilterType::Uuid => V::Uuid(parse_uuid(&raw, f.param)?),
                FilterType::Bool => V::Bool(match raw.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(ApiError::field(f.param, "must be true or false")),
                }),
            });
            sql += &format!(" and {} = ${}", f.column, params.len());
        }
    }
    params.push(V::Int64(page.limit + 1));
    sql += &format!(" order by r.{} desc limit ${}", R::ID, params.len());
    let rows = ctx.db()?.query(&sql, &params)?;
    page_reply(&page, &rows, R::to_json)
}

fn get<R: Resource>(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = access::<R>(ctx, who, id, Action::Read)?;
    reply_with_etag(get_json::<R>(ctx, &id)?, 200)
}

fn reply_with_etag(body: Value, status: u16) -> Result<Reply, ApiError> {
    let version = body["version"]
        .as_i64()
        .ok_or_else(|| ApiError::internal("a versioned resource has no version"))?;
    Ok(Reply::json(status, body).header("etag", format!("\"{version}\"")))
}

/// A JSON object body, as a map.
fn object_body(req: &HttpRequest) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(&req.body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::field("body", "must be a JSON object")),
        Err(e) => Err(ApiError::field("body", format!("not valid JSON: {e}"))),
    }
}

fn create<R: Resource>(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
) -> Result<Reply, ApiError> {
    let mut body = object_body(req)?;
    let project_id = match body.remove("project_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => return Err(ApiError::field("project_id", "must be a project id")),
    };
    let access = project_of_request(ctx, who, project_id, R::WRITE)?;
    let mut revealed = Map::new();
    let mut reply = ctx.create_once(req, who, |tx, ctx| {
        let id = ctx.new_id();
        R::save(
            tx,
            ctx,
            Write {
                project_id: &access.project_id,
                id: &id,
                doc: Value::Object(body),
                created: true,
                user_id: &who.user_id,
            },
        )?;
        revealed = R::reveal_on_create(tx, &access.project_id, &id)?;
        let row = select_one::<R>(tx, &id, false)?;
        let location = format!("{}/{id}", R::PATH);
        Ok(reply_with_etag(R::to_json(&row)?, 201)?.header("location", location))
    })?;
    if let Some(Value::Object(body)) = reply.body.as_mut() {
        body.extend(revealed);
    }
    Ok(reply)
}

/// The `If-Match` precondition, when sent.
pub fn if_match(req: &HttpRequest) -> Result<Option<IfMatch>, ApiError> {
    req.header("if-match")
        .map(|v| IfMatch::parse(v).map_err(|m| ApiError::field("If-Match", m)))
        .transpose()
}

fn update<R: Resource>(
    ctx: &mut Ctx,
    req: &HttpRequest,
    who: &Principal,
    id: &str,
) -> Result<Reply, ApiError> {
    let (id, access) = access::<R>(ctx, who, id, R::WRITE)?;
    let patch = object_body(req)?;
    let expected = if_match(req)?;
    let errors: Vec<FieldError> = patch
        .keys()
        .filter(|k| !R::FIELDS.contains(&k.as_str()))
        .map(|k| FieldError {
            field: k.clone(),
            message: if ["id", "project_id", "version", "created_at", "updated_at"]
                .contains(&k.as_str())
            {
                "cannot be changed".into()
            } else {
                "unknown field".into()
            },
        })
        .collect();
    if !errors.is_empty() {
        return Err(ApiError::fields(errors));
    }
    let body = ctx.transaction(|tx, ctx| {
        let current = R::to_json(&select_one::<R>(tx, &id, true)?)?;
        let version = current["version"]
            .as_i64()
            .ok_or_else(|| ApiError::internal("a versioned resource has no version"))?;
        if let Some(want) = &expected
            && !want.matches(version)
        {
            return Err(ApiError::PreconditionFailed(format!(
                "the {} is at version {version}, which If-Match does not name (weak tags never match)",
                R::NOUN
            )));
        }
        let mut merged: Value = R::FIELDS
            .iter()
            .filter_map(|f| {
                current
                    .get(*f)
                    .filter(|v| !v.is_null())
                    .map(|v| (f.to_string(), v.clone()))
            })
            .collect::<Map<_, _>>()
            .into();
        sparkops_core::patch::merge(&mut merged, &Value::Object(patch));
        R::save(
            tx,
            ctx,
            Write {
                project_id: &access.project_id,
                id: &id,
                doc: merged,
                created: false,
                user_id: &who.user_id,
            },
        )?;
        R::to_json(&select_one::<R>(tx, &id, false)?)
    })?;
    reply_with_etag(body, 200)
}

fn delete<R: Resource>(ctx: &mut Ctx, who: &Principal, id: &str) -> Result<Reply, ApiError> {
    let (id, _) = access::<R>(ctx, who, id, R::WRITE)?;
    ctx.transaction(|tx, _| {
        select_one::<R>(tx, &id, true)?;
        if let Some(why) = R::in_use(tx, &id)? {
            return Err(ApiError::Conflict(why));
        }
        tx.execute(
            &format!(
                "update {} set deleted_at = now(), updated_at = now(), version = version + 1
                 where {} = $1 and deleted_at is null",
                R::TABLE,
                R::ID
            ),
            &[V::Uuid(id.clone())],
        )?;
        Ok(())
    })?;
    Ok(Reply::no_content())
}

/// A resource's select list: the id column (as text), then `project_id`, `version`,
/// `created_at`, `updated_at` (read by [`common_json`]), then the resource's own columns
/// from index 5.
#[macro_export]
macro_rules! resource_columns {
    ($id:literal, $rest:literal) => {
        concat!(
            "r.",
            $id,
            "::text, r.project_id::text, r.version, ",
            "(r.created_at at time zone 'UTC'), (r.updated_at at time zone 'UTC'), ",
            $rest
        )
    };
}

/// `id`, `project_id`, `version`, `created_at`, `updated_at` from columns 0..5.
pub fn common_json(row: &Row) -> Result<Map<String, Value>, ApiError> {
    use sparkops_core::time::rfc3339;
    let mut m = Map::new();
    m.insert("id".into(), json!(row.text(0)?));
    m.insert("project_id".into(), json!(row.text(1)?));
    m.insert("version".into(), json!(row.int(2)?));
    m.insert("created_at".into(), json!(rfc3339(row.timestamp(3)?)));
    m.insert("updated_at".into(), json!(rfc3339(row.timestamp(4)?)));
    Ok(m)
}

/// Which of `ids` are live rows of `table` in `project_id`.
pub fn live_ids(
    tx: &Tx<'_, Db>,
    table: &str,
    id_column: &str,
    project_id: &str,
    ids: &[String],
) -> Result<std::collections::HashSet<String>, ApiError> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let rows = tx.query(
        &format!(
            "select {id_column}::text from {table}
             where project_id = $1 and deleted_at is null and {id_column}::text = any(string_to_array($2, ','))"
        ),
        &[V::Uuid(project_id.to_string()), V::Text(ids.join(","))],
    )?;
    rows.iter().map(|r| Ok(r.text(0)?)).collect()
}

/// `Err(422)` on `field` when the name is taken (a unique-index violation on `index`).
pub fn name_taken(
    noun: &'static str,
    index: &'static str,
) -> impl Fn(sparkops_core::db::DbError) -> ApiError {
    move |e| {
        if e.is_unique_violation(index) {
            ApiError::Conflict(format!(
                "this project already has a live {noun} with this name"
            ))
        } else {
            e.into()
        }
    }
}

/// A `409` message when a live workflow's current definition has a step whose `field`
/// (`agent_id` or `tool_id`) is `id`.
pub fn used_by_workflows(
    tx: &Tx<'_, Db>,
    field: &str,
    id: &str,
    noun: &str,
) -> Result<Option<String>, ApiError> {
    let rows = tx.query(
        "select w.name from workflows w
         join workflow_versions v on v.workflow_id = w.workflow_id and v.version = w.version
         where w.deleted_at is null
           and v.definition -> 'steps' @> jsonb_build_array(jsonb_build_object($1::text, $2::text))
         order by w.name limit 1",
        &[V::Text(field.into()), V::Text(id.into())],
    )?;
    Ok(rows
        .first()
        .map(|r| r.text(0))
        .transpose()?
        .map(|name| format!("the {noun} is used by workflow '{name}'; change the workflow first")))
}

/// The live resource `id` as answered, read without an access check (callers check first).
pub fn get_json<R: Resource>(ctx: &mut Ctx, id: &str) -> Result<Value, ApiError> {
    let row = ctx.transaction(|tx, _| select_one::<R>(tx, id, false))?;
    R::to_json(&row)
}
