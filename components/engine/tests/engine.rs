//! The engine against a real Postgres, without wasm or a host: every transition, the lock
//! order, and races between them (two advances, an advance against a cancel, a late result
//! against a take-back). Each test has a database of its own.

mod support;

use std::thread;

use chrono::{Duration, Utc};
use serde_json::{Value, json};
use sparkops_core::db::{self, Connection as _, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::workflow::RetryPolicy;
use sparkops_engine::step::{Attempt, Decision, Failure, Lease, Recorded, TakenBack};
use sparkops_engine::{
    Cancel, Claim, ErrorKind, NewRun, Origin, Pause, RunStatus, StartError, StepStatus, lifecycle,
    step, store,
};
use support::*;

fn lease<'a>(run: &'a str, claim: &'a Claim) -> Lease<'a> {
    Lease {
        run_id: run,
        step_key: &claim.step_key,
        lease_id: &claim.lease_id,
    }
}

/// Records `result` for the claimed attempt with the default retry policy.
fn record(db: &Pg, run: &str, claim: &Claim, result: Result<Value, Failure>) -> Recorded {
    record_with(db, run, claim, result, &RetryPolicy::default())
}

fn record_with(
    db: &Pg,
    run: &str,
    claim: &Claim,
    result: Result<Value, Failure>,
    retry: &RetryPolicy,
) -> Recorded {
    let a = ended(run, claim, retry, result);
    db::transaction(db, |tx| step::record(tx, &a)).expect("recorded")
}

/// The run's project and workflow, as the executor passes them.
fn owner(w: &sparkops_engine::Workflow) -> step::Owner<'_> {
    step::Owner {
        project_id: &w.project_id,
        workflow_id: &w.workflow_id,
    }
}

fn keys(claims: &[Claim]) -> Vec<&str> {
    claims.iter().map(|c| c.step_key.as_str()).collect()
}

#[test]
fn a_run_starts_queued_and_its_first_advance_claims_the_roots() {
    let (db, w) = setup(chain(&[("a", &[]), ("b", &[]), ("c", &["a", "b"])]));
    let run = start(&db, &w, json!({"x": 1}));
    assert_eq!(run_status(&db, &run), RunStatus::Queued);
    assert_eq!(kinds(&db, &run), ["run.queued"]);
    let claims = advance(&db, &run);
    assert_eq!(keys(&claims), ["a", "b"]);
    assert_ne!(claims[0].lease_id, claims[1].lease_id);
    assert_eq!(run_status(&db, &run), RunStatus::Running);
    assert_eq!(step_status(&db, &run, "c"), StepStatus::Pending);
    assert_eq!(
        events(&db, &run),
        [
            (1, "run.queued".into(), None),
            (2, "run.started".into(), None),
            (3, "step.started".into(), Some("a".into())),
            (4, "step.started".into(), Some("b".into())),
        ]
    );
    // Advancing again finds nothing new to claim.
    assert!(advance(&db, &run).is_empty());
}

#[test]
fn results_advance_the_chain_and_the_run_succeeds_with_its_leaves_outputs() {
    let (db, w) = setup(chain(&[("a", &[]), ("b", &["a"]), ("c", &["a"])]));
    let run = start(&db, &w, json!({}));
    let a = advance(&db, &run);
    assert_eq!(
        record(&db, &run, &a[0], Ok(json!({"a": 1}))),
        Recorded::Succeeded
    );
    let next = advance(&db, &run);
    assert_eq!(keys(&next), ["b", "c"]);
    assert_eq!(
        record(&db, &run, &next[0], Ok(json!("B"))),
        Recorded::Succeeded
    );
    assert!(advance(&db, &run).is_empty());
    assert_eq!(run_status(&db, &run), RunStatus::Running);
    assert_eq!(
        record(&db, &run, &next[1], Ok(json!("C"))),
        Recorded::Succeeded
    );
    assert!(advance(&db, &run).is_empty());
    assert_eq!(run_status(&db, &run), RunStatus::Succeeded);
    let output = db
        .query(
            "select output from runs where run_id = $1",
            &[V::Uuid(run.clone())],
        )
        .unwrap()[0]
        .json(0)
        .unwrap();
    assert_eq!(output, json!({"b": "B", "c": "C"}));
    assert_eq!(kinds(&db, &run).last().unwrap(), "run.succeeded");
    // A result recorded twice lands once: the lease is gone after the first.
    assert_eq!(
        record(&db, &run, &next[1], Ok(json!("again"))),
        Recorded::Discarded
    );
}

#[test]
fn recording_and_advancing_in_one_transaction_claims_what_became_ready() {
    let (db, w) = setup(chain(&[("a", &[]), ("b", &["a"])]));
    let run = start(&db, &w, json!({}));
    let a = advance(&db, &run);
    let retry = RetryPolicy::default();
    let done = ended(&run, &a[0], &retry, Ok(json!("A")));
    let (recorded, next) = db::transaction(&db, |tx| step::record_and_advance(tx, &done)).unwrap();
    assert_eq!(recorded, Recorded::Succeeded);
    assert_eq!(keys(&next), ["b"]);
    // The same result again is discarded and advances nothing.
    let (recorded, next) = db::transaction(&db, |tx| step::record_and_advance(tx, &done)).unwrap();
    assert_eq!((recorded, next.len()), (Recorded::Discarded, 0));
    let claim_b = next_claim(&db, &run, "b");
    let b = ended(&run, &claim_b, &retry, Ok(json!("B")));
    let (recorded, next) = db::transaction(&db, |tx| step::record_and_advance(tx, &b)).unwrap();
    assert_eq!((recorded, next.len()), (Recorded::Succeeded, 0));
    assert_eq!(run_status(&db, &run), RunStatus::Succeeded);
}

/// The claim a step holds now, read back from the database.
fn next_claim(db: &Pg, run: &str, key: &str) -> Claim {
    let held = db
        .scalar(
            "select lease_id::text || ' ' || attempt from run_steps where run_id = $1 and step_key = $2",
            &[V::Uuid(run.into()), V::Text(key.into())],
        )
        .expect("a held lease");
    let (lease_id, attempt) = held.split_once(' ').unwrap();
    Claim {
        step_key: key.into(),
        lease_id: lease_id.into(),
        attempt: attempt.parse().unwrap(),
    }
}

#[test]
fn a_false_when_skips_its_branch_and_the_join_runs_after_the_branch_taken() {
    let db = database();
    let project = project(&db);
    let definition = json!({"steps": [
        {"key": "check", "kind": "condition", "input": {"ok": "{{ input.ok }}"}},
        {"key": "yes", "kind": "condition", "depends_on": ["check"], "when": "steps.check.output.ok == true"},
        {"key": "no", "kind": "condition", "depends_on": ["check"], "when": "steps.check.output.ok == false"},
        {"key": "join", "kind": "condition", "depends_on": ["yes", "no"]},
    ]});
    let w = workflow(&db, &project, definition, Value::Null, None);
    let run = start(&db, &w, json!({"ok": true}));
    let check = advance(&db, &run);
    record(&db, &run, &check[0], Ok(json!({"ok": true})));
    let branch = advance(&db, &run);
    assert_eq!(keys(&branch), ["yes"]);
    assert_eq!(step_status(&db, &run, "no"), StepStatus::Skipped);
    record(&db, &run, &branch[0], Ok(json!(1)));
    assert_eq!(keys(&advance(&db, &run)), ["join"]);
}

#[test]
fn a_failed_step_fails_the_run_and_cancels_what_did_not_start() {
    let (db, w) = setup(chain(&[("a", &[]), ("b", &[]), ("c", &["a"])]));
    let run = start(&db, &w, json!({}));
    let claims = advance(&db, &run);
    let failed = Failure::new(ErrorKind::Validation, "bad").final_attempt();
    assert_eq!(record(&db, &run, &claims[0], Err(failed)), Recorded::Failed);
    assert!(advance(&db, &run).is_empty());
    assert_eq!(run_status(&db, &run), RunStatus::Failed);
    assert_eq!(step_status(&db, &run, "b"), StepStatus::Cancelled);
    assert_eq!(step_status(&db, &run, "c"), StepStatus::Cancelled);
    // b's executor answers late: its lease went with the run's end.
    assert_eq!(
        record(&db, &run, &claims[1], Ok(json!(1))),
        Recorded::Discarded
    );
    assert_eq!(step_status(&db, &run, "b"), StepStatus::Cancelled);
}

#[test]
fn a_retryable_failure_waits_then_is_claimed_as_a_new_attempt() {
    let db = database();
    let project = project(&db);
    let w = workflow(&db, &project, chain(&[("a", &[])]), Value::Null, None);
    let run = start(&db, &w, json!({}));
    let first = advance(&db, &run);
    let retry = RetryPolicy {
        max_attempts: 2,
        initial_interval_ms: 60_000,
        ..RetryPolicy::default()
    };
    let timeout = Failure::new(ErrorKind::Timeout, "slow");
    assert_eq!(
        record_with(&db, &run, &first[0], Err(timeout.clone()), &retry),
        Recorded::Retrying
    );
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Retrying);
    let wait_s = db.count(
        "select extract(epoch from next_attempt_at - now())::bigint from run_steps where run_id = $1",
        &[V::Uuid(run.clone())],
    );
    assert!((58..=60).contains(&wait_s), "{wait_s}");
    // Not due yet at the tick's time: the sweeper leaves it; due a minute later.
    lifecycle::sweep(&db, Utc::now(), 100).unwrap();
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Retrying);
    let touched = lifecycle::sweep(&db, Utc::now() + Duration::seconds(61), 100).unwrap();
    assert!(touched.contains(&run));
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Ready);
    let second = advance(&db, &run);
    assert_eq!(keys(&second), ["a"]);
    assert_ne!(second[0].lease_id, first[0].lease_id);
    assert_eq!((first[0].attempt, second[0].attempt), (1, 2));
    // The last attempt fails for good.
    assert_eq!(
        record_with(&db, &run, &second[0], Err(timeout), &retry),
        Recorded::Failed
    );
    advance(&db, &run);
    assert_eq!(run_status(&db, &run), RunStatus::Failed);
    let attempts = db.count(
        "select attempt::bigint from run_steps where run_id = $1",
        &[V::Uuid(run.clone())],
    );
    assert_eq!(attempts, 2);
}

#[test]
fn a_non_retryable_kind_and_retry_after_are_honoured() {
    let (db, w) = setup(chain(&[("a", &[]), ("b", &[])]));
    let run = start(&db, &w, json!({}));
    let claims = advance(&db, &run);
    let retry = RetryPolicy {
        max_attempts: 5,
        initial_interval_ms: 1_000,
        non_retryable: vec![ErrorKind::Validation],
        ..RetryPolicy::default()
    };
    let slow = Failure {
        retry_after_ms: Some(120_000),
        ..Failure::new(ErrorKind::RateLimited, "429")
    };
    assert_eq!(
        record_with(&db, &run, &claims[0], Err(slow), &retry),
        Recorded::Retrying
    );
    let wait_s = db.count(
        "select extract(epoch from next_attempt_at - now())::bigint from run_steps where run_id = $1 and step_key = 'a'",
        &[V::Uuid(run.clone())],
    );
    assert!(
        (118..=120).contains(&wait_s),
        "Retry-After outweighs the backoff: {wait_s}"
    );
    let invalid = Failure::new(ErrorKind::Validation, "no");
    assert_eq!(
        record_with(&db, &run, &claims[1], Err(invalid), &retry),
        Recorded::Failed
    );
}

#[test]
fn input_is_checked_before_policies_and_a_refusal_records_nothing() {
    let db = database();
    let project = project(&db);
    let schema =
        json!({"type": "object", "required": ["q"], "properties": {"q": {"type": "string"}}});
    let w = workflow(&db, &project, chain(&[("a", &[])]), schema, None);
    db.execute(
        "insert into policies (policy_id, project_id, name, rules) values (gen_random_uuid(), $1, 'one at a time', $2)",
        &[
            V::Uuid(project.clone()),
            V::Json(json!({"max_concurrent_runs": 1})),
        ],
    )
    .unwrap();
    let first = start(&db, &w, json!({"q": "x"}));
    let owner = db
        .scalar(
            "select owner_id::text from projects where project_id = $1",
            &[V::Uuid(project.clone())],
        )
        .unwrap();
    let try_start = |input: Value| {
        let id = uuid::Uuid::new_v4().to_string();
        let run = NewRun {
            run_id: &id,
            workflow: &w,
            input: &input,
            origin: Origin::Api { user_id: &owner },
            now: Utc::now(),
            max_cost_usd: None,
        };
        db::transaction(&db, |tx| sparkops_engine::start(tx, &run))
    };
    match try_start(json!({"q": 1})) {
        Err(StartError::BadInput(problems)) => assert_eq!(problems[0].field, "input/q"),
        other => panic!("{other:?}"),
    }
    match try_start(json!({"q": "y"})) {
        Err(StartError::Refused(m)) => assert!(m.contains("max_concurrent_runs"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(db.count("select count(*) from runs", &[]), 1);
    // The slot frees when the first run ends.
    let claims = advance(&db, &first);
    record(&db, &first, &claims[0], Ok(json!(1)));
    advance(&db, &first);
    assert!(try_start(json!({"q": "z"})).is_ok());
}

#[test]
fn two_advances_at_once_claim_each_step_once() {
    let (db, w) = setup(chain(&[("a", &[]), ("b", &[]), ("c", &[])]));
    let run = start(&db, &w, json!({}));
    let other = db.another();
    // The first advance holds the run's lock while the second queues behind it.
    db.execute("begin", &[]).unwrap();
    let first = {
        let tx_claims = db::transaction(&NoCommit(&db), |tx| sparkops_engine::advance(tx, &run));
        tx_claims.unwrap()
    };
    let second = thread::scope(|s| {
        let run = &run;
        let racing = s.spawn(move || advance(&other, run));
        wait_for_a_blocked_session(&db.another());
        db.execute("commit", &[]).unwrap();
        racing.join().unwrap()
    });
    assert_eq!(keys(&first), ["a", "b", "c"]);
    assert!(second.is_empty(), "{second:?}");
    // Nothing was done twice: one start of the run, one of each step.
    assert_eq!(
        kinds(&db, &run),
        [
            "run.queued",
            "run.started",
            "step.started",
            "step.started",
            "step.started"
        ]
    );
}

/// A connection whose `begin` and `commit` are left to the test, so a transaction can be
/// held open while another session races it.
struct NoCommit<'a>(&'a Pg);

impl sparkops_core::db::Connection for NoCommit<'_> {
    fn execute(&self, sql: &str, params: &[V]) -> Result<u64, sparkops_core::db::DbError> {
        match sql {
            "begin" | "commit" => Ok(0),
            _ => self.0.execute(sql, params),
        }
    }

    fn query(
        &self,
        sql: &str,
        params: &[V],
    ) -> Result<Vec<sparkops_core::db::Row>, sparkops_core::db::DbError> {
        self.0.query(sql, params)
    }
}

#[test]
fn a_cancel_racing_an_advance_wins_and_late_results_are_discarded() {
    let (db, w) = setup(chain(&[("a", &[]), ("b", &["a"])]));
    let run = start(&db, &w, json!({}));
    let claims = advance(&db, &run);
    // The cancel holds the run's lock; an advance queues behind it and then finishes the run.
    db.execute("begin", &[]).unwrap();
    let cancelled = db::transaction(&NoCommit(&db), |tx| {
        sparkops_engine::cancel(tx, &run, json!({"reason": "test"}))
    })
    .unwrap();
    assert_eq!(cancelled, Cancel::Cancelling);
    let other = db.another();
    let claimed = thread::scope(|s| {
        let run = &run;
        let racing = s.spawn(move || advance(&other, run));
        wait_for_a_blocked_session(&db.another());
        db.execute("commit", &[]).unwrap();
        racing.join().unwrap()
    });
    assert!(claimed.is_empty());
    assert_eq!(run_status(&db, &run), RunStatus::Cancelled);
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Cancelled);
    assert_eq!(step_status(&db, &run, "b"), StepStatus::Cancelled);
    assert_eq!(
        record(&db, &run, &claims[0], Ok(json!(1))),
        Recorded::Discarded
    );
    // Cancelling again is the same request; a run that ended otherwise says how.
    let again = db::transaction(&db, |tx| sparkops_engine::cancel(tx, &run, json!({}))).unwrap();
    assert_eq!(again, Cancel::Already);
    let kinds = kinds(&db, &run);
    assert_eq!(kinds.iter().filter(|k| *k == "run.cancelling").count(), 1);
    assert_eq!(kinds.last().unwrap(), "run.cancelled");
}

#[test]
fn an_expired_lease_is_taken_back_and_the_late_result_of_the_old_attempt_is_discarded() {
    let db = database();
    let project = project(&db);
    let definition = json!({"steps": [{"key": "a", "kind": "condition", "timeout_ms": 1000,
        "retry": {"max_attempts": 2}}]});
    let w = workflow(&db, &project, definition, Value::Null, None);
    let run = start(&db, &w, json!({}));
    let first = advance(&db, &run);
    // The lease is the timeout plus the margin: not expired a second later.
    let soon = Utc::now() + Duration::seconds(2);
    let taken = db::transaction(&db, |tx| step::take_back(tx, &run, "a", soon)).unwrap();
    assert_eq!(taken, TakenBack::Nothing);
    let later = Utc::now() + Duration::seconds(32);
    let touched = lifecycle::sweep(&db, later, 100).unwrap();
    assert!(touched.contains(&run));
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Ready);
    let second = advance(&db, &run);
    assert_eq!(keys(&second), ["a"]);
    // The dead host's executor was only slow: its result no longer counts.
    assert_eq!(
        record(&db, &run, &first[0], Ok(json!("old"))),
        Recorded::Discarded
    );
    assert_eq!(
        record(&db, &run, &second[0], Ok(json!("new"))),
        Recorded::Succeeded
    );
    advance(&db, &run);
    assert_eq!(run_status(&db, &run), RunStatus::Succeeded);
    // Out of attempts, a taken-back step fails with `timeout`.
    let run = start(&db, &w, json!({}));
    advance(&db, &run);
    lifecycle::sweep(&db, later, 100).unwrap();
    advance(&db, &run);
    let after_both = Utc::now() + Duration::seconds(64);
    let taken = db::transaction(&db, |tx| step::take_back(tx, &run, "a", after_both)).unwrap();
    assert_eq!(taken, TakenBack::Failed);
    let kind = db.scalar(
        "select error->>'kind' from run_steps where run_id = $1",
        &[V::Uuid(run.clone())],
    );
    assert_eq!(kind.as_deref(), Some("timeout"));
}

/// Seconds from now to the step's lease expiry.
fn lease_left_s(db: &Pg, run: &str, key: &str) -> f64 {
    db.scalar(
        "select extract(epoch from lease_expires_at - now())::text from run_steps
         where run_id = $1 and step_key = $2",
        &[V::Uuid(run.into()), V::Text(key.into())],
    )
    .expect("a lease")
    .parse()
    .expect("a number")
}

/// Moves one of the step's times to `seconds` from now, as if time had passed.
fn set_in(db: &Pg, run: &str, key: &str, column: &str, seconds: i64) {
    db.execute(
        &format!(
            "update run_steps set {column} = now() + make_interval(secs => $3::float8)
             where run_id = $1 and step_key = $2"
        ),
        &[
            V::Uuid(run.into()),
            V::Text(key.into()),
            V::Float64(seconds as f64),
        ],
    )
    .unwrap();
}

#[test]
fn a_lease_is_short_whatever_the_timeout_and_renewals_hold_it_until_the_attempts_deadline() {
    let (db, w) = setup(json!({"steps": [
        {"key": "a", "kind": "condition", "timeout_ms": 600_000, "retry": {"max_attempts": 2}}]}));
    let run = start(&db, &w, json!({}));
    let claim = advance(&db, &run).remove(0);
    let held = lease(&run, &claim);
    // Fifteen seconds, not the ten-minute timeout: a dead host's step comes back quickly.
    let left = lease_left_s(&db, &run, "a");
    assert!((14.0..=15.0).contains(&left), "{left}");
    // Near its end, a renewal gives the lease another fifteen seconds.
    set_in(&db, &run, "a", "lease_expires_at", 1);
    assert!(step::renew(&db, &held).unwrap());
    let left = lease_left_s(&db, &run, "a");
    assert!((14.0..=15.0).contains(&left), "{left}");
    // Never past the attempt's deadline (its timeout and a margin)...
    set_in(&db, &run, "a", "deadline_at", 5);
    assert!(step::renew(&db, &held).unwrap());
    let left = lease_left_s(&db, &run, "a");
    assert!((4.0..=5.0).contains(&left), "{left}");
    // ...and not at all once it has passed: the executor is told to stop.
    set_in(&db, &run, "a", "deadline_at", -1);
    set_in(&db, &run, "a", "lease_expires_at", -1);
    assert!(!step::renew(&db, &held).unwrap());
    // Taken back after the deadline, the attempt is said to have run past its timeout.
    let now = Utc::now();
    assert_eq!(
        db::transaction(&db, |tx| step::take_back(tx, &run, "a", now)).unwrap(),
        TakenBack::Again
    );
    let reasons = db
        .scalar(
            "select string_agg(data->>'reason', '|') from run_events
             where run_id = $1 and kind = 'step.lease_expired'",
            &[V::Uuid(run.clone())],
        )
        .unwrap();
    assert!(reasons.contains("past its timeout"), "{reasons}");
    // The old lease renews nothing; the new attempt's is its own, and a host that stops
    // renewing it loses the step a lease later, long before the timeout.
    assert!(!step::renew(&db, &held).unwrap());
    let second = advance(&db, &run).remove(0);
    assert!(step::renew(&db, &lease(&run, &second)).unwrap());
    let after_a_lease = Utc::now() + Duration::seconds(16);
    assert_eq!(
        db::transaction(&db, |tx| step::take_back(tx, &run, "a", after_a_lease)).unwrap(),
        TakenBack::Failed
    );
    let error = db
        .scalar(
            "select error->>'message' from run_steps where run_id = $1",
            &[V::Uuid(run.clone())],
        )
        .unwrap();
    assert!(error.contains("stopped answering"), "{error}");
    assert!(!step::renew(&db, &lease(&run, &second)).unwrap());
}

#[test]
fn an_approval_waits_for_an_approver_and_is_decided_once() {
    let db = database();
    let project = project(&db);
    let owner = db
        .scalar(
            "select owner_id::text from projects where project_id = $1",
            &[V::Uuid(project.clone())],
        )
        .unwrap();
    let definition = json!({"steps": [
        {"key": "ask", "kind": "approval", "approval": {"timeout_s": 60, "approvers": [owner]}},
        {"key": "after", "kind": "condition", "depends_on": ["ask"]},
    ]});
    let w = workflow(&db, &project, definition, Value::Null, None);
    let run = start(&db, &w, json!({}));
    assert!(
        advance(&db, &run).is_empty(),
        "an approval needs no executor"
    );
    assert_eq!(step_status(&db, &run, "ask"), StepStatus::Waiting);
    assert_eq!(run_status(&db, &run), RunStatus::Waiting);
    let decide = |user: &str, approved: bool| {
        let d = Decision {
            user_id: user,
            approved,
            comment: Some("ok"),
            via: "api",
            administers: false,
        };
        db::transaction(&db, |tx| step::decide_approval(tx, &run, "ask", &d))
    };
    let stranger = uuid::Uuid::new_v4().to_string();
    assert!(matches!(
        decide(&stranger, true),
        Err(ApiError::Forbidden(_))
    ));
    let (status, decision) = decide(&owner, true).unwrap();
    assert_eq!(status, StepStatus::Succeeded);
    assert_eq!(decision["approved"], true);
    assert!(matches!(decide(&owner, false), Err(ApiError::Conflict(_))));
    assert_eq!(keys(&advance(&db, &run)), ["after"]);
    assert_eq!(run_status(&db, &run), RunStatus::Running);
}

#[test]
fn a_rejection_fails_the_run_and_an_approval_past_its_deadline_times_out() {
    let db = database();
    let project = project(&db);
    let definition =
        json!({"steps": [{"key": "ask", "kind": "approval", "approval": {"timeout_s": 60}}]});
    let w = workflow(&db, &project, definition, Value::Null, None);
    let rejected = start(&db, &w, json!({}));
    advance(&db, &rejected);
    let no = Decision {
        user_id: &uuid::Uuid::new_v4().to_string(),
        approved: false,
        comment: None,
        via: "api",
        administers: false,
    };
    db::transaction(&db, |tx| step::decide_approval(tx, &rejected, "ask", &no)).unwrap();
    advance(&db, &rejected);
    assert_eq!(run_status(&db, &rejected), RunStatus::Failed);
    let kind = db.scalar(
        "select error->>'kind' from run_steps where run_id = $1",
        &[V::Uuid(rejected.clone())],
    );
    assert_eq!(kind.as_deref(), Some(ErrorKind::Rejected.as_str()));

    let late = start(&db, &w, json!({}));
    advance(&db, &late);
    let touched = lifecycle::sweep(&db, Utc::now() + Duration::seconds(61), 100).unwrap();
    assert!(touched.contains(&late));
    assert_eq!(step_status(&db, &late, "ask"), StepStatus::Failed);
    advance(&db, &late);
    assert_eq!(run_status(&db, &late), RunStatus::Failed);
}

#[test]
fn a_run_past_its_timeout_ends_timed_out_and_queues_its_trace() {
    let db = database();
    let project = project(&db);
    db.execute(
        "update projects set trace_endpoint = 'http://127.0.0.1:4318' where project_id = $1",
        &[V::Uuid(project.clone())],
    )
    .unwrap();
    let w = workflow(&db, &project, chain(&[("a", &[])]), Value::Null, Some(10));
    let run = start(&db, &w, json!({}));
    let claims = advance(&db, &run);
    lifecycle::sweep(&db, Utc::now() + Duration::seconds(5), 100).unwrap();
    assert_eq!(run_status(&db, &run), RunStatus::Running);
    lifecycle::sweep(&db, Utc::now() + Duration::seconds(11), 100).unwrap();
    assert_eq!(run_status(&db, &run), RunStatus::TimedOut);
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Cancelled);
    assert_eq!(
        record(&db, &run, &claims[0], Ok(json!(1))),
        Recorded::Discarded
    );
    assert_eq!(
        db.count(
            "select count(*) from trace_exports where run_id = $1",
            &[V::Uuid(run.clone())]
        ),
        1
    );
}

#[test]
fn the_sweep_returns_runs_with_something_to_decide() {
    let db = database();
    let project = project(&db);
    let w = workflow(&db, &project, chain(&[("a", &[])]), Value::Null, None);
    let lost = start(&db, &w, json!({}));
    let busy = start(&db, &w, json!({}));
    advance(&db, &busy);
    // A cancel of a run with a step in flight leaves it cancelling until that step ends.
    let cancelling = start(&db, &w, json!({}));
    advance(&db, &cancelling);
    let cancel = db::transaction(&db, |tx| lifecycle::cancel(tx, &cancelling, json!({})));
    assert_eq!(cancel.unwrap(), Cancel::Cancelling);
    let done = start(&db, &w, json!({}));
    let claims = advance(&db, &done);
    record(&db, &done, &claims[0], Ok(json!(1)));
    advance(&db, &done);
    assert_eq!(run_status(&db, &done), RunStatus::Succeeded);
    let touched = lifecycle::sweep(&db, Utc::now(), 100).unwrap();
    assert!(touched.contains(&lost), "a queued run whose nudge was lost");
    assert!(touched.contains(&cancelling), "a cancelling run");
    assert!(
        !touched.contains(&busy),
        "a run with a step in flight waits for it"
    );
    assert!(!touched.contains(&done), "a finished run");
}

/// A retry from `failed` of run `of` by `user`, reusing its step `a` (input `{"in": 1}`,
/// output `{"out": 1}`).
fn retry_reusing_a<'a>(
    id: &'a str,
    w: &'a sparkops_engine::Workflow,
    input: &'a Value,
    user: &'a str,
    of: &'a str,
) -> NewRun<'a> {
    NewRun {
        run_id: id,
        workflow: w,
        input,
        origin: Origin::Retry {
            user_id: user,
            of,
            from: "failed",
            reused: [("a".to_string(), (json!({"in": 1}), json!({"out": 1})))].into(),
        },
        now: Utc::now(),
        max_cost_usd: None,
    }
}

#[test]
fn retries_reuse_the_succeeded_steps_of_the_run_they_retry() {
    let (db, w) = setup(chain(&[("a", &[]), ("b", &["a"])]));
    let project = w.project_id.clone();
    let id = uuid::Uuid::new_v4().to_string();
    let of = start(&db, &w, json!({}));
    let user = db
        .scalar(
            "select owner_id::text from projects where project_id = $1",
            &[V::Uuid(project.clone())],
        )
        .unwrap();
    let input = json!({});
    let run = retry_reusing_a(&id, &w, &input, &user, &of);
    db::transaction(&db, |tx| sparkops_engine::start(tx, &run)).unwrap();
    assert_eq!(step_status(&db, &id, "a"), StepStatus::Succeeded);
    assert_eq!(keys(&advance(&db, &id)), ["b"]);
    let queued = db
        .query(
            "select data from run_events where run_id = $1 and seq = 1",
            &[V::Uuid(id.clone())],
        )
        .unwrap()[0]
        .json(0)
        .unwrap();
    assert_eq!(queued["reused"], json!(["a"]));
    assert_eq!(queued["retry_of"], json!(of));
}

/// Everything a start and its first advance write of a run, without ids and times: the
/// run, its steps, its events and its webhook deliveries.
/// The kinds of the events [`written`] read, in order.
fn event_kinds(written: &Value) -> Vec<&str> {
    written["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e[1].as_str().unwrap())
        .collect()
}

fn written(db: &Pg, run: &str) -> Value {
    let id = [V::Uuid(run.into())];
    let one = |sql: &str| db.query(sql, &id).unwrap()[0].json(0).unwrap();
    json!({
        "run": one("select jsonb_build_object('status', status, 'started', started_at is not null,
                'event_seq', event_seq, 'output', output, 'error', error, 'finished', finished_at is not null)
             from runs where run_id = $1"),
        "steps": one("select jsonb_agg(jsonb_build_array(step_key, status, attempt, lease_id is not null,
                deadline_at is not null, lease_expires_at is not null, started_at is not null,
                finished_at is not null, error, input, output) order by step_key)
             from run_steps where run_id = $1"),
        "events": one("select jsonb_agg(jsonb_build_array(seq, kind, step_key, data) order by seq)
             from run_events where run_id = $1"),
        "told": one("select coalesce(jsonb_agg(jsonb_build_array(event_type, payload->'data'->>'status',
                payload->'data'->>'step_key', payload->'data'->'detail') order by delivery_id), '[]')
             from webhook_deliveries where (payload->'data'->>'run_id')::uuid = $1"),
    })
}

#[test]
fn a_run_advanced_in_its_starting_statement_is_what_a_start_and_a_later_advance_write() {
    let db = database();
    // A project (one workflow each) whose webhook hears of approvals, and its owner.
    let project = || {
        let project = project(&db);
        webhook(&db, &project, "{step.waiting_approval}");
        let owner = db
            .scalar(
                "select owner_id::text from projects where project_id = $1",
                &[V::Uuid(project.clone())],
            )
            .unwrap();
        (project, owner)
    };
    // Started inline (one statement) and started queued then advanced after the commit by
    // a read of the table: the same claims, and the same rows, events and deliveries.
    let compare = |w: &sparkops_engine::Workflow, input: Value, origin: Origin| {
        let (inline_id, later_id) = (
            uuid::Uuid::new_v4().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        let new_run = |id| NewRun {
            run_id: id,
            workflow: w,
            input: &input,
            origin: origin.clone(),
            now: Utc::now(),
            max_cost_usd: None,
        };
        let (inline_run, later_run) = (new_run(&inline_id), new_run(&later_id));
        let inline = db::transaction(&db, |tx| {
            sparkops_engine::start_advanced(tx, &inline_run, None)
        })
        .unwrap();
        db::transaction(&db, |tx| sparkops_engine::start(tx, &later_run)).unwrap();
        let later = advance(&db, &later_id);
        assert_eq!(keys(&inline.claimed), keys(&later));
        assert_eq!(
            inline.claimed.iter().map(|c| c.attempt).collect::<Vec<_>>(),
            later.iter().map(|c| c.attempt).collect::<Vec<_>>()
        );
        let got = written(&db, &inline_id);
        assert_eq!(got, written(&db, &later_id));
        // The leases the claims carry are the steps' own.
        for c in &inline.claimed {
            let held = db.count(
                "select count(*) from run_steps where run_id = $1 and step_key = $2 and lease_id::text = $3",
                &[V::Uuid(inline_id.clone()), V::Text(c.step_key.clone()), V::Text(c.lease_id.clone())],
            );
            assert_eq!(held, 1, "{c:?}");
        }
        got
    };
    // Tool steps claimed, a root skipped by its `when`, an approval waiting (and told).
    let (p, user) = project();
    let mixed = workflow(
        &db,
        &p,
        json!({"steps": [
            {"key": "a", "kind": "condition", "input": {}},
            {"key": "b", "kind": "condition", "input": {}, "depends_on": ["a"]},
            {"key": "gate", "kind": "approval", "input": {}, "approval": {"timeout_s": 60}},
            {"key": "off", "kind": "condition", "input": {}, "when": "input.go == true"},
            {"key": "after_off", "kind": "condition", "input": {}, "depends_on": ["off"]},
        ]}),
        Value::Null,
        Some(600),
    );
    let got = compare(&mixed, json!({"go": false}), Origin::Api { user_id: &user });
    assert_eq!(got["run"]["status"], "running", "{got}");
    let kinds = event_kinds(&got);
    assert_eq!(
        kinds,
        [
            "run.queued",
            "run.started",
            "step.skipped",
            "step.skipped",
            "step.started",
            "step.waiting"
        ]
    );
    assert_eq!(
        got["told"],
        json!([["step.waiting_approval", "running", "gate", {"timeout_s": 60, "approvers": [], "quorum": 1}]])
    );

    // Only an approval: the run waits, and its webhook says so.
    let (p, user) = project();
    let gate = workflow(
        &db,
        &p,
        json!({"steps": [{"key": "gate", "kind": "approval", "input": {}}]}),
        Value::Null,
        None,
    );
    let got = compare(&gate, json!({}), Origin::Api { user_id: &user });
    assert_eq!(got["run"]["status"], "waiting");
    assert_eq!(got["told"][0][1], "waiting");

    // Every step skipped at once: the run ends in its start.
    let (p, user) = project();
    let none = workflow(
        &db,
        &p,
        json!({"steps": [{"key": "off", "kind": "condition", "input": {}, "when": "input.go == true"}]}),
        Value::Null,
        None,
    );
    let got = compare(&none, json!({"go": false}), Origin::Api { user_id: &user });
    assert_eq!(got["run"]["status"], "succeeded");

    // A retry from `failed`: the reused step succeeded already, the rest claimed.
    let (p, user) = project();
    let w = workflow(
        &db,
        &p,
        chain(&[("a", &[]), ("b", &["a"]), ("c", &[])]),
        Value::Null,
        None,
    );
    let of = start(&db, &w, json!({}));
    let reused = Origin::Retry {
        user_id: &user,
        of: &of,
        from: "failed",
        reused: [("a".to_string(), (json!({"in": 1}), json!({"out": 1})))].into(),
    };
    let got = compare(&w, json!({}), reused);
    assert_eq!(got["run"]["status"], "running");
    assert_eq!(got["steps"][0][1], "succeeded");
    assert_eq!(got["events"][0][3]["reused"], json!(["a"]));
}

#[test]
fn a_paused_run_starts_nothing_and_its_clock_stands_still_until_resumed() {
    let db = database();
    let project = project(&db);
    let w = workflow(
        &db,
        &project,
        chain(&[("a", &[]), ("b", &["a"]), ("c", &["b"])]),
        Value::Null,
        Some(60),
    );
    let run = start(&db, &w, json!({}));
    let a = advance(&db, &run);
    let pause = |run: &str| db::transaction(&db, |tx| lifecycle::pause(tx, run, json!({})));
    let resume = |run: &str| db::transaction(&db, |tx| lifecycle::resume(tx, run, json!({})));
    assert_eq!(pause(&run).unwrap(), Pause::Done);
    assert_eq!(pause(&run).unwrap(), Pause::Already);
    assert_eq!(run_status(&db, &run), RunStatus::Paused);
    // The running step finishes and is recorded; nothing new starts.
    assert_eq!(record(&db, &run, &a[0], Ok(json!(1))), Recorded::Succeeded);
    assert!(advance(&db, &run).is_empty());
    assert_eq!(step_status(&db, &run, "b"), StepStatus::Pending);
    // Past its deadline while paused: not timed out, and a sweep does not advance it.
    let touched = lifecycle::sweep(&db, Utc::now() + Duration::seconds(120), 100).unwrap();
    assert!(!touched.contains(&run));
    assert_eq!(run_status(&db, &run), RunStatus::Paused);
    let deadline = |db: &Pg| {
        db.scalar(
            "select extract(epoch from deadline_at)::text from runs where run_id = $1",
            &[V::Uuid(run.clone())],
        )
        .unwrap()
        .parse::<f64>()
        .unwrap()
    };
    let before = deadline(&db);
    thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(resume(&run).unwrap(), Pause::Done);
    assert_eq!(resume(&run).unwrap(), Pause::Already);
    // The deadline moved on by the time it was paused.
    assert!(deadline(&db) - before >= 0.3, "{} {before}", deadline(&db));
    let b = advance(&db, &run);
    assert_eq!(keys(&b), ["b"]);
    record(&db, &run, &b[0], Ok(json!(2)));
    let c = advance(&db, &run);
    record(&db, &run, &c[0], Ok(json!(3)));
    advance(&db, &run);
    assert_eq!(run_status(&db, &run), RunStatus::Succeeded);
    let kinds = kinds(&db, &run);
    let pos = |k: &str| kinds.iter().position(|x| x == k).unwrap();
    assert!(pos("run.paused") < pos("run.resumed"));
    // Every step ran once.
    assert_eq!(
        db.count(
            "select count(*) from run_steps where run_id = $1 and attempt = 1 and status = 'succeeded'",
            &[V::Uuid(run.clone())]
        ),
        3
    );
    // A finished run can be neither paused nor resumed; a paused one can be cancelled.
    assert_eq!(pause(&run).unwrap(), Pause::Not(RunStatus::Succeeded));
    let other = start(&db, &w, json!({}));
    pause(&other).unwrap();
    let cancelled = db::transaction(&db, |tx| lifecycle::cancel(tx, &other, json!({}))).unwrap();
    assert_eq!(cancelled, Cancel::Cancelling);
    advance(&db, &other);
    assert_eq!(run_status(&db, &other), RunStatus::Cancelled);
}

#[test]
fn a_paused_run_s_approval_does_not_expire_and_its_deadline_moves_on() {
    let db = database();
    let project = project(&db);
    let definition =
        json!({"steps": [{"key": "ask", "kind": "approval", "approval": {"timeout_s": 60}}]});
    let w = workflow(&db, &project, definition, Value::Null, None);
    let run = start(&db, &w, json!({}));
    advance(&db, &run);
    assert_eq!(run_status(&db, &run), RunStatus::Waiting);
    db::transaction(&db, |tx| lifecycle::pause(tx, &run, json!({}))).unwrap();
    lifecycle::sweep(&db, Utc::now() + Duration::seconds(3600), 100).unwrap();
    assert_eq!(step_status(&db, &run, "ask"), StepStatus::Waiting);
    db::transaction(&db, |tx| lifecycle::resume(tx, &run, json!({}))).unwrap();
    advance(&db, &run);
    assert_eq!(run_status(&db, &run), RunStatus::Waiting);
    lifecycle::sweep(&db, Utc::now() + Duration::seconds(61), 100).unwrap();
    assert_eq!(step_status(&db, &run, "ask"), StepStatus::Failed);
}

#[test]
fn an_approval_with_a_quorum_waits_for_enough_distinct_approvers_and_one_rejection_fails_it() {
    let db = database();
    let project = project(&db);
    let people: Vec<String> = (0..3).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let definition = json!({"steps": [{"key": "ask", "kind": "approval",
        "approval": {"timeout_s": 60, "approvers": people, "quorum": 2}}]});
    let w = workflow(&db, &project, definition, Value::Null, None);
    let decide = |run: &str, user: &str, approved: bool| {
        let d = Decision {
            user_id: user,
            approved,
            comment: None,
            via: "link",
            administers: false,
        };
        db::transaction(&db, |tx| step::decide_approval(tx, run, "ask", &d))
    };
    let run = start(&db, &w, json!({}));
    advance(&db, &run);
    assert_eq!(
        decide(&run, &people[0], true).unwrap().0,
        StepStatus::Waiting
    );
    assert!(matches!(
        decide(&run, &people[0], true),
        Err(ApiError::Conflict(_))
    ));
    let stranger = uuid::Uuid::new_v4().to_string();
    assert!(matches!(
        decide(&run, &stranger, true),
        Err(ApiError::Forbidden(_))
    ));
    assert_eq!(step_status(&db, &run, "ask"), StepStatus::Waiting);
    assert_eq!(
        decide(&run, &people[2], true).unwrap().0,
        StepStatus::Succeeded
    );
    let output = db
        .scalar(
            "select output::text from run_steps where run_id = $1",
            &[V::Uuid(run.clone())],
        )
        .unwrap();
    let output: Value = serde_json::from_str(&output).unwrap();
    let by: Vec<&str> = output["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["by"].as_str().unwrap())
        .collect();
    assert_eq!(by.len(), 2);
    assert!(by.contains(&people[0].as_str()) && by.contains(&people[2].as_str()));
    assert_eq!(output["approvals"][0]["via"], "link");
    advance(&db, &run);
    assert_eq!(run_status(&db, &run), RunStatus::Succeeded);
    assert!(kinds(&db, &run).contains(&"step.approval_recorded".to_string()));

    let rejected = start(&db, &w, json!({}));
    advance(&db, &rejected);
    decide(&rejected, &people[0], true).unwrap();
    assert_eq!(
        decide(&rejected, &people[1], false).unwrap().0,
        StepStatus::Failed
    );
    advance(&db, &rejected);
    assert_eq!(run_status(&db, &rejected), RunStatus::Failed);
}

/// A run's own `max_cost_usd`: each call's worst case is held against what the run has
/// left, a call that would pass it is refused as the rule `max_cost_usd`, settling swaps
/// the hold for the real cost, and a hold whose call never settled is released once it
/// expires.
#[test]
fn a_runs_own_budget_holds_each_calls_worst_case_and_refuses_past_it() {
    use sparkops_core::money::Usd;
    use sparkops_engine::policies::{self, RefusedOr};
    let (db, w) = setup(chain(&[("a", &[])]));
    let run = start_capped(&db, &w, json!({}), Some(Usd::parse("0.30").unwrap()));
    let usd = |s: &str| Usd::parse(s).unwrap();
    let now = Utc::now();
    let later = now + chrono::Duration::minutes(5);
    let held = |db: &Pg| {
        db.scalar(
            "select reserved_usd::text from runs where run_id = $1",
            &[V::Uuid(run.clone())],
        )
        .unwrap()
    };
    let reserve = |worst: Option<Usd>, expires| {
        policies::reserve(
            &db,
            uuid::Uuid::new_v4().to_string(),
            &run,
            &[],
            now,
            worst,
            expires,
            None,
        )
    };

    let first = reserve(Some(usd("0.20")), later).expect("0.20 of 0.30 fits");
    assert_eq!(held(&db), "0.200000");
    let Err(RefusedOr::Refused(v)) = reserve(Some(usd("0.15")), later) else {
        panic!("0.20 held + 0.15 passes 0.30");
    };
    assert_eq!((v.policy.as_str(), v.rule), ("run", "max_cost_usd"));
    assert!(v.detail.contains("0.300000"), "{}", v.detail);
    let Err(RefusedOr::Refused(unpriced)) = reserve(None, later) else {
        panic!("an unpriced call cannot be held to the run's budget");
    };
    assert!(unpriced.detail.contains("no price"), "{}", unpriced.detail);

    // Settled with the cost added to the run in the same transaction: 0.12 spent, no hold.
    db::transaction(&db, |tx| {
        tx.execute(
            "update runs set cost_usd = cost_usd + 0.12 where run_id = $1",
            &[V::Uuid(run.clone())],
        )?;
        policies::settle_in(tx, &first, Some(usd("0.12")), 10)
    })
    .unwrap();
    assert_eq!(held(&db), "0.000000");
    reserve(Some(usd("0.18")), later).expect("0.12 spent + 0.18 fits 0.30 exactly");
    assert!(matches!(
        reserve(Some(usd("0.000001")), later),
        Err(RefusedOr::Refused(_))
    ));

    // A hold whose call never settled comes back once it expires, and only then.
    assert_eq!(policies::release_expired(&db, now, 100).unwrap(), 0);
    assert_eq!(held(&db), "0.180000");
    policies::release_expired(&db, later + chrono::Duration::seconds(1), 100).unwrap();
    assert_eq!(held(&db), "0.000000");
    assert_eq!(
        db.count("select count(*) from run_cost_reservations", &[]),
        0
    );

    // A run without a cap holds nothing and is never refused by one.
    let free = start(&db, &w, json!({}));
    policies::reserve(
        &db,
        uuid::Uuid::new_v4().to_string(),
        &free,
        &[],
        now,
        None,
        later,
        None,
    )
    .expect("no cap");
    assert_eq!(
        db.count("select count(*) from run_cost_reservations", &[]),
        0
    );
}

/// A budget that refuses a call with `on_exhausted: wait | ask` (as the agent records it: a
/// `Failure::held` carrying the hold) parks the step as `waiting`, its lease cleared and its
/// attempt given back, the run `waiting`; the sweeper sends a `wait` on once the window has
/// turned or the budget was changed, and an `ask` is decided by the project's admins only.
#[test]
fn a_budget_hold_parks_the_step_until_its_window_turns_its_budget_changes_or_an_admin_decides() {
    let (db, w) = setup(chain(&[("a", &[])]));
    let policy = |on_exhausted: &str, limit: &str| {
        db.scalar(
            "insert into policies (policy_id, project_id, name, rules)
             values (gen_random_uuid(), $1, $2, $3) returning policy_id::text",
            &[
                V::Uuid(w.project_id.clone()),
                V::Text(format!("budget {}", uuid::Uuid::new_v4())),
                V::Json(json!({"budget": {"limit_usd": limit, "window": "day", "on_exhausted": on_exhausted}})),
            ],
        )
        .unwrap()
    };
    let now = Utc::now();
    let window_end = sparkops_core::policy::Window::Day.end_after(now).unwrap();
    let park = |run: &str, policy_id: &str, mode: &str| {
        let claim = advance(&db, run).pop().expect("a claim");
        assert_eq!(claim.attempt, 1);
        let hold = json!({"reason": "budget", "mode": mode, "policy_id": policy_id, "policy": "budget",
            "limit_usd": "1.000000", "estimate_usd": "0.400000",
            "resumes_at": sparkops_core::time::rfc3339(window_end),
            "checkpoint": {"messages": [{"role": "user", "content": "hi"}], "iteration": 2, "model": 0}});
        let recorded = record(&db, run, &claim, Err(Failure::held("over budget", hold)));
        assert_eq!(recorded, Recorded::Held);
        // The lease is gone: a late result of the same attempt changes nothing.
        assert_eq!(
            record(&db, run, &claim, Ok(json!("late"))),
            Recorded::Discarded
        );
    };

    // wait: held, then on when the window turns (and not before).
    let waiting = policy("wait", "1");
    let run = start(&db, &w, json!({}));
    park(&run, &waiting, "wait");
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Waiting);
    advance(&db, &run);
    assert_eq!(run_status(&db, &run), RunStatus::Waiting);
    let attempt = db.scalar(
        "select attempt::text from run_steps where run_id = $1",
        &[V::Uuid(run.clone())],
    );
    assert_eq!(attempt.as_deref(), Some("0"), "the attempt is given back");
    let held = events(&db, &run)
        .into_iter()
        .find(|e| e.1 == "step.held")
        .unwrap();
    assert_eq!(held.2.as_deref(), Some("a"));
    let data: Value = serde_json::from_str(
        &db.scalar(
            "select data::text from run_events where run_id = $1 and kind = 'step.held'",
            &[V::Uuid(run.clone())],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&data["mode"], &data["estimate_usd"]),
        (&json!("wait"), &json!("0.400000"))
    );
    assert!(
        data.get("checkpoint").is_none(),
        "the event names the hold, not the conversation"
    );
    lifecycle::sweep(&db, window_end - Duration::seconds(1), 100).unwrap();
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Waiting);
    // An approval's deadline sweep never touches a held step.
    lifecycle::sweep(
        &db,
        now + Duration::hours(2).min(window_end - now - Duration::seconds(1)),
        100,
    )
    .unwrap();
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Waiting);
    let touched = lifecycle::sweep(&db, window_end, 100).unwrap();
    assert!(touched.contains(&run));
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Ready);
    let again = advance(&db, &run);
    assert_eq!((again.len(), again[0].attempt), (1, 1));
    let hold: Value = serde_json::from_str(
        &db.scalar(
            "select hold::text from run_steps where run_id = $1",
            &[V::Uuid(run.clone())],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        hold["checkpoint"]["iteration"], 2,
        "the checkpoint waits for the executor"
    );
    assert_eq!(hold["resumed"]["why"], "the budget's window turned");

    // wait: on at once when the budget is raised.
    let run = start(&db, &w, json!({}));
    park(&run, &waiting, "wait");
    lifecycle::sweep(&db, now, 100).unwrap();
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Waiting);
    db.execute(
        "update policies set rules = jsonb_set(rules, '{budget,limit_usd}', '\"5\"') where policy_id = $1",
        &[V::Uuid(waiting.clone())],
    )
    .unwrap();
    lifecycle::sweep(&db, now, 100).unwrap();
    assert_eq!(step_status(&db, &run, "a"), StepStatus::Ready);

    // ask: a member may not decide; an admin's approval sends it on; a rejection fails it.
    let asking = policy("ask", "1");
    let decide = |run: &str, approved: bool, administers: bool| {
        let d = Decision {
            user_id: "0191e7a2-1f6e-7fff-bfff-ffffffffffff",
            approved,
            comment: Some("this once"),
            via: "api",
            administers,
        };
        db::transaction(&db, |tx| step::decide_approval(tx, run, "a", &d))
    };
    let run = start(&db, &w, json!({}));
    park(&run, &asking, "ask");
    lifecycle::sweep(&db, window_end + Duration::days(1), 100).unwrap();
    assert_eq!(
        step_status(&db, &run, "a"),
        StepStatus::Waiting,
        "an ask waits for a person"
    );
    assert!(matches!(
        decide(&run, true, false),
        Err(ApiError::Forbidden(_))
    ));
    let (status, decision) = decide(&run, true, true).unwrap();
    assert_eq!(
        (status, &decision["policy_id"]),
        (StepStatus::Ready, &json!(asking))
    );
    assert_eq!(keys(&advance(&db, &run)), ["a"]);
    let run = start(&db, &w, json!({}));
    park(&run, &asking, "ask");
    let (status, _) = decide(&run, false, true).unwrap();
    assert_eq!(status, StepStatus::Failed);
    advance(&db, &run);
    assert_eq!(run_status(&db, &run), RunStatus::Failed);
    let kind = db.scalar(
        "select error->>'kind' from run_steps where run_id = $1",
        &[V::Uuid(run.clone())],
    );
    assert_eq!(kind.as_deref(), Some("rejected"));
    // A wait is not decided by anyone.
    let run = start(&db, &w, json!({}));
    park(&run, &waiting, "wait");
    assert!(matches!(
        decide(&run, true, true),
        Err(ApiError::Conflict(_))
    ));
}

/// A call recorded as unpriced because its provider reported no usage still spends the
/// run's own `max_cost_usd`: the price of its estimated tokens counts as spent there.
#[test]
fn an_unreported_calls_estimate_counts_against_the_runs_own_budget() {
    use sparkops_core::money::Usd;
    use sparkops_engine::policies::{self, RefusedOr};
    let (db, w) = setup(chain(&[("a", &[])]));
    let run = start_capped(&db, &w, json!({}), Some(Usd::parse("0.30").unwrap()));
    advance(&db, &run);
    let usd = |s: &str| Usd::parse(s).unwrap();
    let usage = step::Usage {
        model: "fake/small",
        tokens_in: 100,
        tokens_out: 10,
        cost: None,
        estimated: Some(usd("0.25")),
    };
    db::transaction(&db, |tx| step::add_usage(tx, &run, "a", &usage, json!({}))).unwrap();
    let row = db
        .scalar(
            "select cost_usd::text || ' ' || unpriced_calls || ' ' || estimated_usd::text from runs where run_id = $1",
            &[V::Uuid(run.clone())],
        )
        .unwrap();
    assert_eq!(
        row, "0.000000 1 0.250000",
        "unpriced, with its estimate kept apart"
    );
    let later = Utc::now() + Duration::minutes(5);
    let reserve = |worst: &str| {
        policies::reserve(
            &db,
            uuid::Uuid::new_v4().to_string(),
            &run,
            &[],
            Utc::now(),
            Some(usd(worst)),
            later,
            None,
        )
    };
    let Err(RefusedOr::Refused(v)) = reserve("0.06") else {
        panic!("0.25 estimated + 0.06 passes 0.30");
    };
    assert!(v.detail.contains("0.250000 spent"), "{}", v.detail);
    reserve("0.05").expect("0.25 estimated + 0.05 fits 0.30 exactly");
}

/// The attempt of `claim`, ended with `result`.
fn ended<'a>(
    run: &'a str,
    claim: &'a Claim,
    retry: &'a RetryPolicy,
    result: Result<Value, Failure>,
) -> Attempt<'a> {
    Attempt {
        lease: lease(run, claim),
        attempt: claim.attempt,
        input: json!({"in": claim.step_key}),
        result,
        duration_ms: 5,
        retry,
        jitter: 0.0,
    }
}

#[test]
fn a_result_written_without_the_lock_is_what_the_locked_transaction_writes() {
    let db = database();
    // A project (one workflow each) that is told of its runs' ends and exports traces.
    let project = || {
        let project = project(&db);
        db.execute(
            "update projects set trace_endpoint = 'http://127.0.0.1:4318' where project_id = $1",
            &[V::Uuid(project.clone())],
        )
        .unwrap();
        webhook(&db, &project, "{run.succeeded,run.failed}");
        project
    };
    let once = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    // Each result of two runs of `w`, one written by the one statement from the run as
    // read after the claim (carried on from the write before when it chains), the other by
    // the locked transaction: the same claims, rows, events and deliveries.
    let compare = |w: &sparkops_engine::Workflow, results: &[(&str, Result<Value, Failure>)]| {
        let (fast, slow) = (start(&db, w, json!({})), start(&db, w, json!({})));
        let (mut fast_claims, mut slow_claims) = (advance(&db, &fast), advance(&db, &slow));
        let mut known = Some(store::known(&db, &fast).unwrap());
        for (key, result) in results {
            let pick =
                |claims: &[Claim]| claims.iter().find(|c| c.step_key == *key).unwrap().clone();
            let (f, s) = (pick(&fast_claims), pick(&slow_claims));
            let carried = known
                .take()
                .unwrap_or_else(|| store::known(&db, &fast).unwrap());
            let attempt = ended(&fast, &f, &once, result.clone());
            let step::Unlocked::Written {
                recorded,
                claimed,
                after,
                ..
            } = step::record_and_advance_known(&db, &attempt, carried, owner(w)).unwrap()
            else {
                panic!("an unmoved run is written");
            };
            let attempt = ended(&slow, &s, &once, result.clone());
            let (locked, locked_claims) =
                db::transaction(&db, |tx| step::record_and_advance(tx, &attempt)).unwrap();
            assert_eq!(recorded, locked);
            assert_eq!(keys(&claimed), keys(&locked_claims));
            // The run as carried on is the run as read again.
            assert_eq!(
                after.snapshot.steps,
                store::known(&db, &fast).unwrap().snapshot.steps
            );
            known = Some(after);
            fast_claims.extend(claimed);
            slow_claims.extend(locked_claims);
        }
        let got = written(&db, &fast);
        assert_eq!(got, written(&db, &slow));
        let traces = db.count(
            "select count(*) from trace_exports where run_id in ($1, $2)",
            &[V::Uuid(fast.clone()), V::Uuid(slow.clone())],
        );
        (got, traces)
    };
    // A chain with a branch its `when` skips: the next step claimed, then the end.
    let w = workflow(
        &db,
        &project(),
        json!({"steps": [
            {"key": "a", "kind": "condition", "input": {}},
            {"key": "b", "kind": "condition", "input": {}, "depends_on": ["a"]},
            {"key": "off", "kind": "condition", "input": {}, "depends_on": ["a"], "when": "input.go == true"},
        ]}),
        Value::Null,
        None,
    );
    let (got, traces) = compare(&w, &[("a", Ok(json!("A"))), ("b", Ok(json!("B")))]);
    assert_eq!(got["run"]["status"], "succeeded", "{got}");
    assert_eq!(got["run"]["output"], json!({"b": "B"}));
    assert_eq!(got["told"].as_array().unwrap().len(), 1, "{got}");
    assert_eq!(got["told"][0][0], "run.succeeded");
    assert_eq!(traces, 2);
    let kinds = event_kinds(&got);
    assert_eq!(
        kinds,
        [
            "run.queued",
            "run.started",
            "step.started",
            "step.succeeded",
            "step.skipped",
            "step.started",
            "step.succeeded",
            "run.succeeded"
        ]
    );
    // Two branches: one fails for good, the run fails and the other is cancelled.
    let w = workflow(
        &db,
        &project(),
        chain(&[("x", &[]), ("y", &[])]),
        Value::Null,
        None,
    );
    let failed = Failure::new(ErrorKind::ToolError, "no").final_attempt();
    let (got, _) = compare(&w, &[("x", Err(failed))]);
    assert_eq!(got["run"]["status"], "failed", "{got}");
    assert_eq!(got["steps"][1][1], "cancelled", "{got}");
    assert_eq!(got["told"][0][0], "run.failed");
}

#[test]
fn a_result_for_a_run_that_moved_since_it_was_read_writes_nothing_without_the_lock() {
    let db = database();
    let project = project(&db);
    let w = workflow(
        &db,
        &project,
        chain(&[("x", &[]), ("y", &[]), ("z", &["x", "y"])]),
        Value::Null,
        None,
    );
    let retry = RetryPolicy::default();
    let run = start(&db, &w, json!({}));
    let claims = advance(&db, &run);
    let (x, y) = (&claims[0], &claims[1]);
    // Both branches' executors read the run; x's result lands first.
    let (for_x, for_y) = (
        store::known(&db, &run).unwrap(),
        store::known(&db, &run).unwrap(),
    );
    let done_x = ended(&run, x, &retry, Ok(json!(1)));
    let written_x = step::record_and_advance_known(&db, &done_x, for_x, owner(&w)).unwrap();
    assert!(matches!(written_x, step::Unlocked::Written { ref claimed, .. } if claimed.is_empty()));
    // y's executor read the run before that: nothing is written; read again, its result is
    // written and the join claimed.
    let before = written(&db, &run);
    let done_y = ended(&run, y, &retry, Ok(json!(2)));
    assert!(matches!(
        step::record_and_advance_known(&db, &done_y, for_y, owner(&w)).unwrap(),
        step::Unlocked::Moved
    ));
    assert_eq!(written(&db, &run), before);
    let again = store::known(&db, &run).unwrap();
    let step::Unlocked::Written {
        recorded, claimed, ..
    } = step::record_and_advance_known(&db, &done_y, again, owner(&w)).unwrap()
    else {
        panic!("the run read again is written");
    };
    assert_eq!((recorded, keys(&claimed)), (Recorded::Succeeded, vec!["z"]));

    // A run cancelled after the read: nothing written, and the locked path records the
    // result and ends the run cancelled.
    let run = start(&db, &w, json!({}));
    let claims = advance(&db, &run);
    let known = store::known(&db, &run).unwrap();
    db::transaction(&db, |tx| lifecycle::cancel(tx, &run, json!({}))).unwrap();
    let before = written(&db, &run);
    let done = ended(&run, &claims[0], &retry, Ok(json!(1)));
    assert!(matches!(
        step::record_and_advance_known(&db, &done, known, owner(&w)).unwrap(),
        step::Unlocked::Moved
    ));
    assert_eq!(written(&db, &run), before);
    db::transaction(&db, |tx| step::record_and_advance(tx, &done)).unwrap();
    assert_eq!(run_status(&db, &run), RunStatus::Cancelled);

    // A cancel holding the run's lock as the result arrives: the write queues behind it,
    // finds the run moved when it commits, and writes nothing.
    let run = start(&db, &w, json!({}));
    let claims = advance(&db, &run);
    let known = store::known(&db, &run).unwrap();
    db.execute("begin", &[]).unwrap();
    db::transaction(&NoCommit(&db), |tx| lifecycle::cancel(tx, &run, json!({}))).unwrap();
    let other = db.another();
    let written_then = thread::scope(|s| {
        let (run, claim, retry, w) = (&run, &claims[0], &retry, &w);
        let racing = s.spawn(move || {
            let done = ended(run, claim, retry, Ok(json!(1)));
            step::record_and_advance_known(&other, &done, known, owner(w)).unwrap()
        });
        wait_for_a_blocked_session(&db.another());
        db.execute("commit", &[]).unwrap();
        racing.join().unwrap()
    });
    assert!(matches!(written_then, step::Unlocked::Moved));
    assert_eq!(step_status(&db, &run, "x"), StepStatus::Running);
    assert_eq!(run_status(&db, &run), RunStatus::Cancelling);

    // A step taken back (its lease expired) after the read: the late result is not written.
    let run = start(&db, &w, json!({}));
    let claims = advance(&db, &run);
    let known = store::known(&db, &run).unwrap();
    db.execute(
        "update run_steps set lease_expires_at = now() - interval '1 second' where run_id = $1 and step_key = 'x'",
        &[V::Uuid(run.clone())],
    )
    .unwrap();
    let taken = db::transaction(&db, |tx| step::take_back(tx, &run, "x", Utc::now())).unwrap();
    assert_ne!(taken, TakenBack::Nothing);
    let before = written(&db, &run);
    let late = ended(&run, &claims[0], &retry, Ok(json!("late")));
    assert!(matches!(
        step::record_and_advance_known(&db, &late, known, owner(&w)).unwrap(),
        step::Unlocked::Moved
    ));
    assert_eq!(written(&db, &run), before);

    // A budget's hold is written under the lock only.
    let run = start(&db, &w, json!({}));
    let claims = advance(&db, &run);
    let known = store::known(&db, &run).unwrap();
    let held = ended(
        &run,
        &claims[0],
        &retry,
        Err(Failure::held("over budget", json!({"why": "budget"}))),
    );
    assert!(matches!(
        step::record_and_advance_known(&db, &held, known, owner(&w)).unwrap(),
        step::Unlocked::UnderLock
    ));
    assert_eq!(step_status(&db, &run, "x"), StepStatus::Running);
}

#[test]
fn an_executor_reads_its_lease_with_the_run_and_a_steps_policies_with_its_tool() {
    let (db, w) = setup(chain(&[("a", &[]), ("b", &["a"])]));
    let run = start(&db, &w, json!({}));
    let a = advance(&db, &run);
    // A held lease: its attempt, the run's project and workflow, and the run as read; a
    // condition step calls no tool, so no scope.
    let (leased, known, scope) = step::leased_known(&db, &lease(&run, &a[0]))
        .unwrap()
        .unwrap();
    assert!(scope.is_none());
    assert_eq!(leased.attempt, 1);
    assert_eq!(leased.workflow_id, w.workflow_id);
    assert_eq!(leased.project_id, w.project_id);
    assert_eq!(
        known.snapshot.steps,
        store::known(&db, &run).unwrap().snapshot.steps
    );
    // Another lease id, or one expired, holds nothing.
    let stranger = Claim {
        lease_id: uuid::Uuid::new_v4().to_string(),
        ..a[0].clone()
    };
    assert!(
        step::leased_known(&db, &lease(&run, &stranger))
            .unwrap()
            .is_none()
    );
    db.execute(
        "update run_steps set lease_expires_at = now() - interval '1 second' where run_id = $1",
        &[V::Uuid(run.clone())],
    )
    .unwrap();
    assert!(
        step::leased_known(&db, &lease(&run, &a[0]))
            .unwrap()
            .is_none()
    );

    // The policies in scope, in order, with the tool (or none).
    let project = leased.project_id;
    let ours = tool(&db, &project);
    let read = |tool: &str| {
        sparkops_engine::policies::tool_scope(&db, &project, &w.workflow_id, tool).unwrap()
    };
    let scope = read(&ours);
    assert!(scope.policies.is_empty());
    let found = scope.tool.unwrap();
    assert_eq!(
        (found.method.as_str(), found.url.as_str(), found.timeout_ms),
        ("PUT", "https://tools.example.com/t", 1234)
    );
    assert_eq!(found.headers, json!({"x-team": "a"}));
    assert_eq!(found.input_schema, json!({"type": "object"}));
    assert_eq!(found.output_schema, Value::Null);
    // Two policies of the project, one of this workflow; one of another workflow and one
    // of an agent, neither in a tool step's scope; one disabled.
    let other = db
        .scalar(
            "insert into workflows (workflow_id, project_id, name) values (gen_random_uuid(), $1, 'other')
             returning workflow_id::text",
            &[V::Uuid(project.clone())],
        )
        .unwrap();
    for (id, name, workflow, enabled) in [
        (
            "00000000-0000-4000-8000-000000000002",
            "second",
            Some(&w.workflow_id),
            true,
        ),
        ("00000000-0000-4000-8000-000000000001", "first", None, true),
        (
            "00000000-0000-4000-8000-000000000003",
            "elsewhere",
            Some(&other),
            true,
        ),
        ("00000000-0000-4000-8000-000000000004", "off", None, false),
    ] {
        db.execute(
            "insert into policies (policy_id, project_id, name, scope_workflow_id, enabled, rules)
             values ($1, $2, $3, $4, $5, '{\"max_steps_per_run\": 5}')",
            &[
                V::Uuid(id.into()),
                V::Uuid(project.clone()),
                V::Text(name.into()),
                workflow.map_or(V::Null, |w| V::Uuid(w.clone())),
                V::Bool(enabled),
            ],
        )
        .unwrap();
    }
    let scope = read(&ours);
    let names: Vec<(&str, bool)> = scope
        .policies
        .iter()
        .map(|p| (p.name.as_str(), p.workflow_scoped))
        .collect();
    assert_eq!(names, [("first", false), ("second", true)]);
    assert_eq!(scope.policies[0].rules.max_steps_per_run, Some(5));
    assert!(scope.tool.is_some());
    // A tool of another project, or none, is no tool; the policies are read all the same.
    let stranger = tool(&db, &support::project(&db));
    for missing in [stranger, uuid::Uuid::new_v4().to_string()] {
        let scope = read(&missing);
        assert_eq!(scope.policies.len(), 2);
        assert!(scope.tool.is_none());
    }
}

#[test]
fn a_scope_that_does_not_read_is_left_to_the_step_and_never_fails_the_write() {
    let db = database();
    let project = project(&db);
    let t = tool(&db, &project);
    let definition = json!({"steps": [
        {"key": "a", "kind": "tool", "tool_id": t, "input": {}},
        {"key": "b", "kind": "tool", "tool_id": t, "input": {}, "depends_on": ["a"]},
    ]});
    let w = workflow(&db, &project, definition, Value::Null, None);
    let run = start(&db, &w, json!({}));
    let a = advance(&db, &run);
    // A stored rule today's checks refuse (an empty list of allowed tools).
    db.execute(
        "insert into policies (policy_id, project_id, name, rules)
         values (gen_random_uuid(), $1, 'old', '{\"allowed_tools\": []}')",
        &[V::Uuid(project.clone())],
    )
    .unwrap();
    let (_, known, scope) = step::leased_known(&db, &lease(&run, &a[0]))
        .unwrap()
        .unwrap();
    assert!(scope.is_none());
    // The result is written and b claimed; b's scope is left for its own read, which fails.
    let retry = RetryPolicy::default();
    let attempt = ended(&run, &a[0], &retry, Ok(json!({})));
    let step::Unlocked::Written { claimed, next, .. } =
        step::record_and_advance_known(&db, &attempt, known, owner(&w)).unwrap()
    else {
        panic!("an unmoved run is written");
    };
    assert_eq!(keys(&claimed), ["b"]);
    assert!(next.is_none());
    assert_eq!(step_status(&db, &run, "b"), StepStatus::Running);
    assert!(sparkops_engine::policies::tool_scope(&db, &project, &w.workflow_id, &t).is_err());
}

/// A tool of `project`: `PUT https://tools.example.com/t`, a header, a 1,234 ms timeout.
fn tool(db: &Pg, project: &str) -> String {
    db.scalar(
        "insert into tools (tool_id, project_id, name, method, url, headers, timeout_ms)
         values (gen_random_uuid(), $1, gen_random_uuid()::text, 'PUT', 'https://tools.example.com/t', '{\"x-team\": \"a\"}', 1234)
         returning tool_id::text",
        &[V::Uuid(project.into())],
    )
    .expect("a tool")
}

#[test]
fn a_chained_results_write_reads_the_scope_of_the_tool_step_it_claims() {
    let db = database();
    let project = project(&db);
    let (t1, t2) = (tool(&db, &project), tool(&db, &project));
    db.execute(
        "update tools set url = 'https://tools.example.com/2' where tool_id = $1",
        &[V::Uuid(t2.clone())],
    )
    .unwrap();
    // a, then b (a tool) and c (a condition) at once, then d (another tool) after both.
    let definition = json!({"steps": [
        {"key": "a", "kind": "tool", "tool_id": t1, "input": {}},
        {"key": "b", "kind": "tool", "tool_id": t2, "input": {}, "depends_on": ["a"]},
        {"key": "c", "kind": "condition", "input": {}, "depends_on": ["a"]},
        {"key": "d", "kind": "tool", "tool_id": t1, "input": {}, "depends_on": ["b", "c"]},
    ]});
    let w = workflow(&db, &project, definition, Value::Null, None);
    let run = start(&db, &w, json!({}));
    let first = advance(&db, &run);
    // The lease read of a (a tool step) carries a's scope.
    let (_, _, scope) = step::leased_known(&db, &lease(&run, &first[0]))
        .unwrap()
        .unwrap();
    let read = sparkops_engine::policies::tool_scope(&db, &project, &w.workflow_id, &t1).unwrap();
    assert_eq!(scope.unwrap().tool, read.tool);
    assert!(read.tool.is_some());
    let once = RetryPolicy::default();
    let write = |claim: &Claim| {
        let known = store::known(&db, &run).unwrap();
        let attempt = ended(&run, claim, &once, Ok(json!({})));
        match step::record_and_advance_known(&db, &attempt, known, owner(&w)).unwrap() {
            step::Unlocked::Written { claimed, next, .. } => (claimed, next),
            other => panic!("an unmoved run is written: {other:?}"),
        }
    };
    // a's result claims b and c; b calls a tool, so its scope comes with the claims.
    let (claimed, next) = write(&first[0]);
    assert_eq!(keys(&claimed), ["b", "c"]);
    let next = next.expect("the scope of b");
    assert_eq!(next.step_key, "b");
    let read = sparkops_engine::policies::tool_scope(&db, &project, &w.workflow_id, &t2).unwrap();
    assert_eq!(next.scope.tool, read.tool);
    assert_eq!(next.scope.tool.unwrap().url, "https://tools.example.com/2");
    // c's result claims nothing (d waits for b): no scope.
    let c = claimed.iter().find(|c| c.step_key == "c").unwrap();
    let (claimed_after_c, next) = write(c);
    assert!(claimed_after_c.is_empty() && next.is_none());
    // b's result claims d, with the tool of d.
    let b = claimed.iter().find(|c| c.step_key == "b").unwrap();
    let (claimed, next) = write(b);
    assert_eq!(keys(&claimed), ["d"]);
    let next = next.unwrap();
    assert_eq!(
        (
            next.step_key.as_str(),
            next.scope.tool.unwrap().url.as_str()
        ),
        ("d", "https://tools.example.com/t")
    );
    // d's result ends the run: nothing claimed, nothing read.
    let (claimed, next) = write(&claimed[0]);
    assert!(claimed.is_empty() && next.is_none());
    assert_eq!(run_status(&db, &run), RunStatus::Succeeded);

    // Claims come in the order decided, and only the first, the one the executor runs
    // next, comes with a scope: a condition claimed before a tool step leaves the tool
    // step to the scope its own lease read brings.
    let other = support::project(&db);
    let t = tool(&db, &other);
    let definition = json!({"steps": [
        {"key": "a", "kind": "tool", "tool_id": t, "input": {}},
        {"key": "c", "kind": "tool", "tool_id": t, "input": {}, "depends_on": ["a"]},
        {"key": "b", "kind": "condition", "input": {}, "depends_on": ["a"]},
    ]});
    let w = workflow(&db, &other, definition, Value::Null, None);
    let run = start(&db, &w, json!({}));
    let first = advance(&db, &run);
    let known = store::known(&db, &run).unwrap();
    let attempt = ended(&run, &first[0], &once, Ok(json!({})));
    let step::Unlocked::Written { claimed, next, .. } =
        step::record_and_advance_known(&db, &attempt, known, owner(&w)).unwrap()
    else {
        panic!("an unmoved run is written");
    };
    assert_eq!(keys(&claimed), ["b", "c"]);
    assert!(next.is_none());
    let (_, _, scope) = step::leased_known(&db, &lease(&run, &claimed[1]))
        .unwrap()
        .unwrap();
    assert!(scope.unwrap().tool.is_some());
}
