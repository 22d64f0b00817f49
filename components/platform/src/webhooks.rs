//! Outgoing webhooks: the secrets they are signed with, and delivering the outbox.
//!
//! Events are queued by the engine in the transaction that makes them
//! (`sparkops_engine::outbox`). The `notifier` cron component calls [`deliver_due`] every
//! second: it claims due deliveries under a lease (replicas never send one at once; a
//! crashed notifier's deliveries come back when the lease ends), signs each attempt per
//! Standard Webhooks ([`sparkops_core::webhook`]) with every secret in use, and records the
//! outcome on the delivery and its webhook. Delivery is at least once: an attempt whose
//! answer was lost is sent again, with the same `webhook-id`, for the receiver to
//! de-duplicate. A failed attempt is retried with exponential backoff (honouring
//! `Retry-After`); a webhook failing for [`DISABLE_AFTER_S`] is disabled, saying why.
//! Redirects are failures, never followed (the URL rules hold for the URL the user saved).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sparkops_core::db::{AS_TIMESTAMPTZ, Connection as _, Tx, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::llm;
use sparkops_core::webhook;

use crate::db::Db;
use crate::outbound::{self, Call, Chosen, check_user_url};
use crate::pipeline::{master_keys, sealed_at};
use crate::work::Work;

/// Deliveries one tick takes on at most; the next tick takes the rest.
const PER_TICK: usize = 2000;
const BATCH: i64 = 50;
/// How long a claimed delivery is held before another notifier may take it.
const LEASE_S: i64 = 60;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a tick starts new attempts; with one request's timeout on top, well inside
/// [`LEASE_S`].
const TICK_BUDGET: Duration = Duration::from_secs(30);
/// After the due work, a tick keeps looking for new deliveries until it has run this long,
/// every [`POLL`]: an event then waits about [`POLL`] for its first attempt, not the rest of
/// a one-second tick.
const LINGER: Duration = Duration::from_millis(900);
const POLL: Duration = Duration::from_millis(100);
/// The first retry waits this long; each next one twice as long, up to [`MAX_BACKOFF_S`].
const FIRST_BACKOFF_S: i64 = 5;
const MAX_BACKOFF_S: i64 = 3600;
/// A webhook whose deliveries have failed for this long is disabled, and a delivery this
/// old is given up.
pub const DISABLE_AFTER_S: i64 = 3 * 86_400;
/// How long a rotated-out secret keeps signing, unless the rotation says otherwise.
pub const DEFAULT_OVERLAP_S: i64 = 86_400;

// ---- Signing secrets -----------------------------------------------------------------------

/// Seals `secret` as the current secret of `owner_id` (a webhook or a trigger); a secret it
/// replaces keeps working for `overlap_s` seconds (0: not at all).
pub fn set_secret(
    tx: &Tx<'_, Db>,
    project_id: &str,
    owner_id: &str,
    secret: &str,
    overlap_s: i64,
) -> Result<(), ApiError> {
    let sealed = master_keys()?.seal(project_id, owner_id, secret, crate::random_array());
    tx.execute(
        "update signing_secrets set expires_at = now() + make_interval(secs => $2::float8)
         where owner_id = $1 and (expires_at is null or expires_at > now() + make_interval(secs => $2::float8))",
        &[V::Uuid(owner_id.into()), V::Float64(overlap_s as f64)],
    )?;
    tx.execute(
        "insert into signing_secrets (owner_id, project_id, seq, ciphertext, nonce, key_id)
         select $1, $2, coalesce(max(seq), 0) + 1, $3, $4, $5 from signing_secrets where owner_id = $1",
        &[
            V::Uuid(owner_id.into()),
            V::Uuid(project_id.into()),
            V::Bytes(sealed.ciphertext),
            V::Bytes(sealed.nonce.to_vec()),
            V::Text(sealed.key_id),
        ],
    )?;
    Ok(())
}

/// The secrets of `owner_id` in use now, newest first.
pub fn secrets_in_use(db: &Db, project_id: &str, owner_id: &str) -> Result<Vec<String>, ApiError> {
    let keys = master_keys()?;
    let rows = db.query(
        "select ciphertext, nonce, key_id from signing_secrets
         where owner_id = $1 and (expires_at is null or expires_at > now()) order by seq desc",
        &[V::Uuid(owner_id.into())],
    )?;
    rows.iter()
        .map(|row| {
            keys.open(project_id, owner_id, &sealed_at(row, 0)?)
                .map_err(|e| ApiError::internal(format!("a signing secret does not open: {e:?}")))
        })
        .collect()
}

// ---- Delivery ------------------------------------------------------------------------------

/// One claimed delivery.
struct Due {
    delivery_id: String,
    webhook_id: String,
    project_id: String,
    payload: Value,
    created_at: DateTime<Utc>,
}

/// What became of one attempt.
#[derive(Debug)]
enum Outcome {
    Delivered {
        status: u16,
    },
    Failed {
        status: Option<u16>,
        error: String,
        /// At least this long before the next attempt (`Retry-After`).
        after_s: i64,
    },
    /// The webhook is gone or disabled: the delivery ends without an attempt.
    Dropped(String),
    /// Not tried: the tick ran out of time. Not counted as an attempt.
    Postponed,
}

/// Sends every due delivery, as at `now` (the tick's time).
pub fn deliver_due(ctx: &mut Work, now: DateTime<Utc>) -> Result<(), ApiError> {
    let started = Instant::now();
    let deadline = started + TICK_BUDGET;
    let mut taken = 0;
    while taken < PER_TICK && Instant::now() < deadline {
        // The tick's time, moved on by how long it has run.
        let now = now + chrono::Duration::from_std(started.elapsed()).unwrap_or_default();
        let claimed = claim(ctx.db()?, now)?;
        if claimed.is_empty() {
            if started.elapsed() >= LINGER {
                break;
            }
            // Nothing due: look again shortly, with no connection held meanwhile.
            ctx.release_db();
            crate::sleep(POLL);
            continue;
        }
        taken += claimed.len();
        // Each webhook of the batch read once (its URL, state and keys), not per delivery.
        let mut receivers = HashMap::new();
        for due in claimed {
            let outcome = if Instant::now() >= deadline {
                Outcome::Postponed
            } else {
                attempt(ctx, &due, &mut receivers).unwrap_or_else(|e| Outcome::Failed {
                    status: None,
                    error: format!("the delivery could not be prepared: {e:?}"),
                    after_s: 0,
                })
            };
            if matches!(outcome, Outcome::Failed { .. }) {
                // A failure may disable the webhook: its next delivery reads it again.
                receivers.remove(&due.webhook_id);
            }
            log(&due, &outcome);
            let db = ctx.db()?;
            sparkops_core::db::transaction(db, |tx| record(tx, &due, &outcome, now))?;
        }
    }
    ctx.db()?.execute(
        &format!(
            "delete from webhook_deliveries
             where status <> 'pending' and created_at < $1{AS_TIMESTAMPTZ} - interval '30 days'"
        ),
        &[V::Timestamp(now)],
    )?;
    Ok(())
}

/// Claims up to [`BATCH`] due deliveries for one attempt each, under a lease.
fn claim(db: &Db, now: DateTime<Utc>) -> Result<Vec<Due>, ApiError> {
    let rows = db.query(
        &format!(
            "with due as (
                select delivery_id from webhook_deliveries
                where status = 'pending' and next_attempt_at <= $1{AS_TIMESTAMPTZ}
                order by next_attempt_at limit $2 for update skip locked)
             update webhook_deliveries d
             set attempts = d.attempts + 1,
                 next_attempt_at = $1{AS_TIMESTAMPTZ} + make_interval(secs => $3)
             from due where d.delivery_id = due.delivery_id
             returning d.delivery_id::text, d.webhook_id::text, d.project_id::text, d.payload,
                 (d.created_at at time zone 'UTC')"
        ),
        &[
            V::Timestamp(now),
            V::Int64(BATCH),
            V::Float64(LEASE_S as f64),
        ],
    )?;
    rows.iter()
        .map(|r| {
            Ok(Due {
                delivery_id: r.text(0)?,
                webhook_id: r.text(1)?,
                project_id: r.text(2)?,
                payload: r.json(3)?,
                created_at: r.timestamp(4)?,
            })
        })
        .collect()
}

/// Where a webhook's deliveries go and the keys that sign them, or why none is sent.
enum Receiver {
    At {
        url: url::Url,
        keys: Vec<Vec<u8>>,
    },
    /// Deleted or disabled: its deliveries end without an attempt.
    Gone(&'static str),
    /// Its URL breaks the rules for URLs users choose: each attempt fails.
    Denied(String),
}

/// `webhook_id`'s receiver as the database has it now.
fn receiver(ctx: &mut Work, project_id: &str, webhook_id: &str) -> Result<Receiver, ApiError> {
    let rows = ctx.db()?.query(
        "select url, enabled and deleted_at is null from webhooks where webhook_id = $1",
        &[V::Uuid(webhook_id.into())],
    )?;
    let Some(row) = rows.first() else {
        return Ok(Receiver::Gone("the webhook was deleted"));
    };
    if !row.bool(1)? {
        return Ok(Receiver::Gone("the webhook was disabled or deleted"));
    }
    let url = match check_user_url(&row.text(0)?) {
        Ok(url) => url,
        Err(e) => return Ok(Receiver::Denied(format!("denied: the url {e}"))),
    };
    let keys = secrets_in_use(ctx.db()?, project_id, webhook_id)?
        .iter()
        .map(|s| webhook::secret_key(s).map_err(ApiError::internal))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Receiver::At { url, keys })
}

/// One signed attempt of `due`, its webhook read into `receivers` unless it is there.
fn attempt(
    ctx: &mut Work,
    due: &Due,
    receivers: &mut HashMap<String, Receiver>,
) -> Result<Outcome, ApiError> {
    let read = match receivers.entry(due.webhook_id.clone()) {
        Entry::Occupied(known) => known.into_mut(),
        Entry::Vacant(slot) => slot.insert(receiver(ctx, &due.project_id, &due.webhook_id)?),
    };
    let (url, keys) = match read {
        Receiver::At { url, keys } => (url, keys),
        Receiver::Gone(why) => return Ok(Outcome::Dropped((*why).into())),
        Receiver::Denied(error) => {
            return Ok(Outcome::Failed {
                status: None,
                error: error.clone(),
                after_s: 0,
            });
        }
    };
    let body = with_links(&due.payload)?.to_string().into_bytes();
    // No connection is held while the receiver answers.
    ctx.release_db();
    let msg_id = format!("msg_{}", due.delivery_id.replace('-', ""));
    let timestamp = Utc::now().timestamp();
    let signature = webhook::signature_header(keys, &msg_id, timestamp, &body);
    let answer = outbound::send(Call {
        method: "POST",
        url,
        chosen: Chosen::ByUser,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("user-agent".into(), "Spark-Ops-Webhooks/1".into()),
            ("webhook-id".into(), msg_id),
            ("webhook-timestamp".into(), timestamp.to_string()),
            ("webhook-signature".into(), signature),
        ],
        body: Some(body),
        timeout: REQUEST_TIMEOUT,
        max_response_bytes: 16 << 10,
    });
    Ok(match answer {
        Ok(a) if (200..300).contains(&a.status) => Outcome::Delivered { status: a.status },
        Ok(a) => {
            let retry_after = crate::outbound::header(&a.headers, "retry-after");
            let wait_ms = llm::classify(a.status, retry_after).1.unwrap_or(0);
            let detail: String = String::from_utf8_lossy(&a.body).chars().take(200).collect();
            Outcome::Failed {
                status: Some(a.status),
                error: format!("the receiver answered {}: {detail}", a.status),
                after_s: (wait_ms / 1000) as i64,
            }
        }
        Err(e) if e.refused() => Outcome::Failed {
            status: None,
            error: format!("denied: {e}"),
            after_s: 0,
        },
        Err(e) => Outcome::Failed {
            status: None,
            error: e.to_string(),
            after_s: 0,
        },
    })
}

/// The body of a delivery: its payload, and for `step.waiting_approval` the approval links
/// (`data.links`): per approver the step names (or one pair for anyone, when it names
/// none), an approve and a reject URL that decide the step without a login, each usable
/// once, until the approval's deadline. They are derived from the payload and the keys, so
/// every attempt sends the same bytes.
fn with_links(payload: &Value) -> Result<Value, ApiError> {
    if payload["type"] != "step.waiting_approval" {
        return Ok(payload.clone());
    }
    let data = &payload["data"];
    let (Some(run_id), Some(step_key), Some(timeout_s), Some(at)) = (
        data["run_id"].as_str(),
        data["step_key"].as_str(),
        data["detail"]["timeout_s"].as_i64(),
        payload["timestamp"]
            .as_str()
            .and_then(sparkops_core::time::parse_rfc3339),
    ) else {
        return Err(ApiError::internal(
            "an approval event lacks its run, step or deadline",
        ));
    };
    let expires = at.timestamp() + timeout_s;
    let mut approvers: Vec<Option<String>> = data["detail"]["approvers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(|s| Some(s.to_string())))
                .collect()
        })
        .unwrap_or_default();
    if approvers.is_empty() {
        approvers.push(None);
    }
    let key = webhook::link_key(&crate::variable("jwt_secret").map_err(ApiError::internal)?);
    let base = crate::variable("public_url").map_err(ApiError::internal)?;
    let base = base.trim_end_matches('/');
    let link = |approver: &Option<String>, approve: bool| {
        let claims = webhook::LinkClaims {
            run_id: run_id.to_string(),
            step_key: step_key.to_string(),
            approver: approver.clone(),
            approve,
            expires,
        };
        format!(
            "{base}/api/v1/approvals/{}",
            webhook::link_token(&key, &claims)
        )
    };
    let links: Vec<Value> = approvers
        .iter()
        .map(|a| {
            json!({"approver": a, "approve_url": link(a, true), "reject_url": link(a, false),
                "expires_at": DateTime::from_timestamp(expires, 0).map(sparkops_core::time::rfc3339)})
        })
        .collect();
    let mut body = payload.clone();
    body["data"]["links"] = json!(links);
    Ok(body)
}

fn log(due: &Due, outcome: &Outcome) {
    let (level, result, error) = match outcome {
        Outcome::Delivered { .. } => ("info", "delivered", None),
        Outcome::Failed { error, .. } => ("warn", "failed", Some(error.as_str())),
        Outcome::Dropped(why) => ("info", "dropped", Some(why.as_str())),
        Outcome::Postponed => ("info", "postponed", None),
    };
    crate::log_line(&json!({"level": level, "msg": "webhook delivery",
        "delivery_id": due.delivery_id, "webhook_id": due.webhook_id,
        "type": due.payload["type"], "result": result, "error": error}));
}

/// Records an attempt's outcome on the delivery and on its webhook, under the webhook's row
/// lock (attempts of one webhook from several ticks then count its failures in turn).
fn record(
    tx: &Tx<'_, Db>,
    due: &Due,
    outcome: &Outcome,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let id = V::Uuid(due.delivery_id.clone());
    let at = V::Timestamp(now);
    match outcome {
        Outcome::Postponed => {
            tx.execute(
                &format!(
                    "update webhook_deliveries set attempts = attempts - 1, next_attempt_at = $2{AS_TIMESTAMPTZ}
                     where delivery_id = $1 and status = 'pending'"
                ),
                &[id, at],
            )?;
        }
        Outcome::Dropped(why) => {
            tx.execute(
                "update webhook_deliveries set status = 'failed', attempts = attempts - 1, last_error = $2
                 where delivery_id = $1 and status = 'pending'",
                &[id, V::Text(why.clone())],
            )?;
        }
        Outcome::Delivered { status } => {
            tx.execute(
                &format!(
                    "update webhook_deliveries set status = 'delivered', delivered_at = $2{AS_TIMESTAMPTZ},
                        last_attempt_at = $2{AS_TIMESTAMPTZ}, last_response_status = $3, last_error = null
                     where delivery_id = $1 and status = 'pending'"
                ),
                &[id, at, V::Int32(*status as i32)],
            )?;
            tx.execute(
                "update webhooks set failing_since = null where webhook_id = $1 and failing_since is not null",
                &[V::Uuid(due.webhook_id.clone())],
            )?;
        }
        Outcome::Failed {
            status,
            error,
            after_s,
        } => {
            let too_old = now - due.created_at > chrono::Duration::seconds(DISABLE_AFTER_S);
            tx.execute(
                &format!(
                    "update webhook_deliveries set last_error = $3, last_response_status = $4,
                        last_attempt_at = $2{AS_TIMESTAMPTZ},
                        status = case when $5 then 'failed' else 'pending' end,
                        next_attempt_at = $2{AS_TIMESTAMPTZ} + make_interval(secs =>
                            greatest($6, least($7, $8 * power(2, attempts - 1))))
                     where delivery_id = $1 and status = 'pending'"
                ),
                &[
                    id,
                    at.clone(),
                    V::Text(error.clone()),
                    status.map_or(V::Null, |s| V::Int32(s as i32)),
                    V::Bool(too_old),
                    V::Float64(*after_s as f64),
                    V::Float64(MAX_BACKOFF_S as f64),
                    V::Float64(FIRST_BACKOFF_S as f64),
                ],
            )?;
            fail_webhook(tx, &due.webhook_id, error, now)?;
        }
    }
    Ok(())
}

/// Notes a failed attempt on the webhook; one failing for [`DISABLE_AFTER_S`] is disabled
/// and its pending deliveries end.
fn fail_webhook(
    tx: &Tx<'_, Db>,
    webhook_id: &str,
    error: &str,
    now: DateTime<Utc>,
) -> Result<(), ApiError> {
    let rows = tx.query(
        &format!(
            "update webhooks set failing_since = coalesce(failing_since, $2{AS_TIMESTAMPTZ})
             where webhook_id = $1 and enabled
             returning (failing_since <= $2{AS_TIMESTAMPTZ} - make_interval(secs => $3))"
        ),
        &[
            V::Uuid(webhook_id.into()),
            V::Timestamp(now),
            V::Float64(DISABLE_AFTER_S as f64),
        ],
    )?;
    if !rows
        .first()
        .map(|r| r.bool(0))
        .transpose()?
        .unwrap_or(false)
    {
        return Ok(());
    }
    let reason = format!(
        "disabled after failing for {} days; the last error: {error}",
        DISABLE_AFTER_S / 86_400
    );
    tx.execute(
        "update webhooks set enabled = false, disabled_reason = $2, updated_at = now(), version = version + 1
         where webhook_id = $1",
        &[V::Uuid(webhook_id.into()), V::Text(reason)],
    )?;
    tx.execute(
        "update webhook_deliveries set status = 'failed', last_error = 'the webhook was disabled'
         where webhook_id = $1 and status = 'pending'",
        &[V::Uuid(webhook_id.into())],
    )?;
    crate::log_line(&json!({"level": "warn", "msg": "webhook disabled", "webhook_id": webhook_id}));
    Ok(())
}
