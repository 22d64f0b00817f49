//! Approval links: the `step.waiting_approval` webhook carries, per approver, an approve and
//! a reject URL (`/api/v1/approvals/{token}`, `sparkops_core::webhook::link_token`) bound to
//! the run, the step, the approver and the decision, until the approval's deadline. They
//! work without a login and record who decided, through what, and when.
//!
//! `GET` shows what the link would decide and never decides: mail scanners and chat
//! previews fetch links. `POST` decides (JSON `{comment?}`, or the form the `GET` page
//! shows to a browser). A link is used once: its approver's decision is recorded once,
//! so the pair's other link is spent too.

use serde_json::{Value, json};
use sparkops_core::db::{Connection as _, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::input::Body;
use sparkops_core::webhook::{self, LinkClaims, LinkRefusal};
use sparkops_platform::engine;
use sparkops_platform::engine::step::{Decision, LINK_APPROVER};
use sparkops_platform::http::{HttpRequest, Reply};
use sparkops_platform::pipeline::Ctx;

/// The link's claims, if it is one of ours and not expired.
fn open(ctx: &Ctx, token: &str) -> Result<LinkClaims, ApiError> {
    let secret = sparkops_platform::variable("jwt_secret").map_err(ApiError::internal)?;
    webhook::open_link(&webhook::link_key(&secret), token, ctx.now.timestamp()).map_err(|r| match r
    {
        LinkRefusal::Expired => ApiError::Forbidden("the approval link has expired".into()),
        LinkRefusal::Malformed | LinkRefusal::BadSignature => {
            ApiError::Unauthenticated("not a valid approval link".into())
        }
    })
}

fn wants_html(req: &HttpRequest) -> bool {
    req.header("accept")
        .is_some_and(|a| a.contains("text/html"))
}

/// `GET /approvals/{token}`: what the link decides, and where the step stands.
pub fn show(ctx: &mut Ctx, req: &HttpRequest, token: &str) -> Result<Reply, ApiError> {
    let claims = open(ctx, token)?;
    let rows = ctx.db()?.query(
        "select s.status, w.name, r.status,
                exists (select 1 from run_step_approvals a
                        where a.run_id = s.run_id and a.step_key = s.step_key and a.approver = $3)
         from run_steps s join runs r on r.run_id = s.run_id
         join workflows w on w.workflow_id = r.workflow_id
         where s.run_id = $1 and s.step_key = $2",
        &[
            V::Uuid(claims.run_id.clone()),
            V::Text(claims.step_key.clone()),
            V::Text(approver(&claims).into()),
        ],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| ApiError::NotFound("the step of this link is gone".into()))?;
    let view = json!({
        "run_id": claims.run_id,
        "step_key": claims.step_key,
        "workflow": row.text(1)?,
        "approver": claims.approver,
        "decision": if claims.approve { "approve" } else { "reject" },
        "expires_at": chrono::DateTime::from_timestamp(claims.expires, 0).map(sparkops_core::time::rfc3339),
        "step_status": row.text(0)?,
        "run_status": row.text(2)?,
        "used": row.bool(3)?,
    });
    if wants_html(req) {
        return Ok(page(&view, None));
    }
    Ok(Reply::ok(view))
}

/// `POST /approvals/{token} {comment?}`: decides the step as the link says.
pub fn decide(ctx: &mut Ctx, req: &HttpRequest, token: &str) -> Result<Reply, ApiError> {
    let claims = open(ctx, token)?;
    let form = req
        .header("content-type")
        .is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));
    let mut b = if form {
        Body::from_form(&req.body)?
    } else {
        Body::parse_or_empty(&req.body)?
    };
    let comment = b.opt_str("comment", 2000).filter(|c| !c.trim().is_empty());
    b.finish()?;
    let decision = Decision {
        user_id: approver(&claims),
        approved: claims.approve,
        comment: comment.as_deref(),
        via: "link",
        administers: false,
    };
    let (step, claimed) = ctx.transaction(|tx, _| {
        let (status, decision) =
            engine::step::decide_approval(tx, &claims.run_id, &claims.step_key, &decision)?;
        let claimed = engine::advance(tx, &claims.run_id)?;
        Ok((
            json!({"run_id": claims.run_id, "step_key": claims.step_key, "status": status.as_str(),
                "decision": decision}),
            claimed,
        ))
    })?;
    ctx.log_run(&claims.run_id);
    ctx.dispatch(&claims.run_id, &claimed);
    if form || wants_html(req) {
        return Ok(page(&step, Some("Recorded.")));
    }
    Ok(Reply::ok(step))
}

/// Who the link decides as: its approver, or [`LINK_APPROVER`] for a step naming none.
fn approver(claims: &LinkClaims) -> &str {
    claims.approver.as_deref().unwrap_or(LINK_APPROVER)
}

/// A small page for a browser: what the link decides, and a button that does it. No
/// script, no outside resource: its Content-Security-Policy allows neither.
fn page(view: &Value, done: Option<&str>) -> Reply {
    let text = |v: &Value| escape(v.as_str().unwrap_or_default());
    let body = match done {
        Some(message) => format!(
            "<p>{}</p><p>The step is now <b>{}</b>.</p>",
            escape(message),
            text(&view["status"])
        ),
        None if view["used"] == true || view["step_status"] != "waiting" => format!(
            "<p>Nothing to decide: the step is <b>{}</b>{}.</p>",
            text(&view["step_status"]),
            if view["used"] == true {
                " and this link was used"
            } else {
                ""
            }
        ),
        None => format!(
            "<form method=\"post\"><label>Comment <textarea name=\"comment\" maxlength=\"2000\"></textarea></label>\
             <button type=\"submit\">{}</button></form>",
            if view["decision"] == "approve" {
                "Approve"
            } else {
                "Reject"
            }
        ),
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Approval</title>\
         <meta name=\"viewport\" content=\"width=device-width\"></head><body>\
         <h1>Step {} of run {}</h1><p>Workflow {}</p>{body}</body></html>",
        text(&view["step_key"]),
        text(&view["run_id"]),
        text(&view["workflow"]),
    );
    Reply::text(200, "text/html; charset=utf-8", html)
        .header(
            "content-security-policy",
            "default-src 'none'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
        )
        .header("cache-control", "no-store")
        .header("referrer-policy", "no-referrer")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
