//! Schedules that fire, end to end: the scheduler cron component fired through the host at
//! chosen times (it takes "now" from the tick), real Postgres and Redis. Schedules are set
//! to fire in 2027, so the host's own once-a-second ticks (at today's time) never touch them.

use crate::common::{Api, User};
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

async fn project(api: &Api) -> (User, String) {
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Cron"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    (ada, p)
}

/// A workflow whose runs finish at once, or (`wait`) hold at an approval step.
async fn workflow(api: &Api, who: &User, p: &str, wait: bool) -> String {
    let steps = if wait {
        json!([{"key": "gate", "kind": "approval", "input": {}, "approval": {"timeout_s": 86400}}])
    } else {
        json!([{"key": "only", "kind": "condition", "input": {"at": "{{ input.tag }}"}}])
    };
    let wf = api
        .create(
            &who.access,
            "/api/v1/workflows",
            json!({"project_id": p, "name": format!("W {}", uuid::Uuid::new_v4()),
                "input_schema": {"type": "object", "required": ["tag"]}, "definition": {"steps": steps}}),
        )
        .await;
    wf["id"].as_str().unwrap().to_string()
}

/// A schedule whose next fire time is set to `first` (as if the scheduler had been waiting
/// for it).
async fn schedule(
    api: &Api,
    who: &User,
    (p, wf): (&str, &str),
    body: Value,
    first: DateTime<Utc>,
) -> String {
    let mut body = body;
    body["project_id"] = json!(p);
    body["workflow_id"] = json!(wf);
    body["input"] = json!({"tag": "nightly"});
    let s = api.create(&who.access, "/api/v1/schedules", body).await;
    let id = s["id"].as_str().unwrap().to_string();
    set_next(api, &id, first).await;
    id
}

/// Sets a schedule's next fire time, as if the scheduler had been waiting for it.
pub(crate) async fn set_next(api: &Api, id: &str, at: DateTime<Utc>) {
    api.env
        .db()
        .await
        .execute(
            "update schedules set next_fire_at = $2 where schedule_id = $1::text::uuid",
            &[&id, &at],
        )
        .await
        .unwrap();
}

/// Fires the scheduler as at `at`.
async fn tick(api: &Api, at: DateTime<Utc>) {
    api.tick("scheduler", at.timestamp()).await;
}

fn utc(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// The schedule's runs (its history through the runs API).
async fn runs_of(api: &Api, who: &User, id: &str) -> Value {
    let schedule = api
        .call(
            "GET",
            &format!("/api/v1/schedules/{id}"),
            Some(&who.access),
            None,
        )
        .await
        .json();
    let project = schedule["project_id"].as_str().unwrap();
    api.call(
        "GET",
        &format!("/api/v1/runs?project_id={project}&schedule_id={id}"),
        Some(&who.access),
        None,
    )
    .await
    .json()
}

/// The schedule's runs' `scheduled_for`, oldest first.
async fn fired_for(api: &Api, who: &User, id: &str) -> Vec<DateTime<Utc>> {
    let runs = runs_of(api, who, id).await;
    let mut times: Vec<DateTime<Utc>> = runs["items"]
        .as_array()
        .unwrap_or_else(|| panic!("{runs}"))
        .iter()
        .map(|r| time(&r["scheduled_for"]))
        .collect();
    times.sort();
    times
}

async fn next_fire(api: &Api, who: &User, id: &str) -> DateTime<Utc> {
    let schedule = api
        .call(
            "GET",
            &format!("/api/v1/schedules/{id}"),
            Some(&who.access),
            None,
        )
        .await
        .json();
    time(&schedule["next_fire_at"])
}

/// An RFC 3339 time the API answered.
fn time(v: &Value) -> DateTime<Utc> {
    utc(v.as_str().unwrap_or_else(|| panic!("not a time: {v}")))
}

async fn fires(api: &Api, who: &User, id: &str) -> Vec<Value> {
    let res = api
        .call(
            "GET",
            &format!("/api/v1/schedules/{id}/fires"),
            Some(&who.access),
            None,
        )
        .await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    res.json()["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn fire_times_follow_dst_changes_in_two_time_zones() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let wf = workflow(&api, &ada, &p, false).await;
    // Berlin springs forward on 2027-03-28: 02:30 does not exist that night.
    let berlin = schedule(
        &api,
        &ada,
        (&p, &wf),
        json!({"cron": "0 30 2 * * *", "timezone": "Europe/Berlin", "overlap": "allow"}),
        utc("2027-03-27T01:30:00Z"),
    )
    .await;
    tick(&api, utc("2027-03-27T01:30:05Z")).await;
    // The skipped local time fires once, at the first instant after the gap (03:00 CEST).
    assert_eq!(
        next_fire(&api, &ada, &berlin).await,
        utc("2027-03-28T01:00:00Z")
    );
    tick(&api, utc("2027-03-28T01:00:03Z")).await;
    assert_eq!(
        next_fire(&api, &ada, &berlin).await,
        utc("2027-03-29T00:30:00Z")
    );
    assert_eq!(
        fired_for(&api, &ada, &berlin).await,
        vec![utc("2027-03-27T01:30:00Z"), utc("2027-03-28T01:00:00Z")]
    );
    // New York falls back on 2027-11-07: 01:30 happens twice and fires once, the first time.
    let new_york = schedule(
        &api,
        &ada,
        (&p, &wf),
        json!({"cron": "30 1 * * *", "timezone": "America/New_York", "overlap": "allow"}),
        utc("2027-11-07T05:30:00Z"),
    )
    .await;
    tick(&api, utc("2027-11-07T05:30:02Z")).await;
    assert_eq!(
        next_fire(&api, &ada, &new_york).await,
        utc("2027-11-08T06:30:00Z")
    );
    // The repeated 01:30 (EST) passes without a fire.
    tick(&api, utc("2027-11-07T06:30:02Z")).await;
    assert_eq!(
        fired_for(&api, &ada, &new_york).await,
        vec![utc("2027-11-07T05:30:00Z")]
    );
    // The runs carry the schedule's input.
    let runs = runs_of(&api, &ada, &new_york).await;
    let run = &runs["items"][0];
    assert_eq!(run["input"], json!({"tag": "nightly"}));
    assert!(run["created_by"].is_null() || run.get("created_by").is_none());
}

#[tokio::test]
async fn two_schedulers_firing_the_same_tick_make_one_run() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let wf = workflow(&api, &ada, &p, false).await;
    let at = utc("2027-01-10T10:00:00Z");
    let id = schedule(
        &api,
        &ada,
        (&p, &wf),
        json!({"cron": "0 * * * *", "overlap": "allow"}),
        at,
    )
    .await;
    let when = at + Duration::seconds(1);
    let (a, b) = tokio::join!(tick(&api, when), tick(&api, when));
    let ((), ()) = (a, b);
    // Twice more, late, for good measure: the fire time is taken.
    tick(&api, when + Duration::seconds(1)).await;
    assert_eq!(
        fired_for(&api, &ada, &id).await,
        vec![utc("2027-01-10T10:00:00Z")]
    );
    let fires = fires(&api, &ada, &id).await;
    assert_eq!(fires.len(), 1);
    assert_eq!(fires[0]["outcome"], "started");
    assert_eq!(
        next_fire(&api, &ada, &id).await,
        utc("2027-01-10T11:00:00Z")
    );
}

#[tokio::test]
async fn after_downtime_fires_inside_the_catch_up_window_run_late_and_older_ones_are_recorded_as_skipped()
 {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let wf = workflow(&api, &ada, &p, false).await;
    let t0 = utc("2027-02-01T08:00:00Z");
    let minutely = |window: i64| json!({"cron": "0 * * * * *", "overlap": "allow", "catchup_window_s": window});
    let with_window = schedule(&api, &ada, (&p, &wf), minutely(300), t0).await;
    let never = schedule(&api, &ada, (&p, &wf), minutely(0), t0).await;
    // The scheduler was down for ten minutes: it comes back at 08:10:05.
    tick(&api, t0 + Duration::seconds(605)).await;
    let at = |m: i64| t0 + Duration::minutes(m);
    // 08:06..08:10 are at most 300 s late: they run, in order; 08:00..08:05 are not.
    assert_eq!(
        fired_for(&api, &ada, &with_window).await,
        (6..=10).map(at).collect::<Vec<_>>()
    );
    let fires = fires(&api, &ada, &with_window).await;
    let skipped: Vec<&Value> = fires.iter().filter(|f| f["outcome"] == "skipped").collect();
    assert_eq!(skipped.len(), 1, "{fires:?}");
    assert_eq!(
        (
            time(&skipped[0]["fire_at"]),
            time(&skipped[0]["missed_until"]),
            &skipped[0]["missed_count"]
        ),
        (at(0), at(5), &json!(6))
    );
    assert!(
        skipped[0]["reason"]
            .as_str()
            .unwrap()
            .contains("catch-up window of 300 s")
    );
    assert_eq!(
        fires.iter().filter(|f| f["outcome"] == "started").count(),
        5
    );
    assert_eq!(next_fire(&api, &ada, &with_window).await, at(11));
    // Without a window only the fire that is on time (within a minute's grace) runs.
    assert_eq!(fired_for(&api, &ada, &never).await, vec![at(10)]);
    let fires = self::fires(&api, &ada, &never).await;
    assert_eq!(fires.len(), 2);
    assert_eq!(
        (&fires[1]["outcome"], &fires[1]["missed_count"]),
        (&json!("skipped"), &json!(10))
    );
}

/// A schedule of a workflow whose runs wait, fired at `t` and an hour later; its runs.
async fn overlap_case(api: &Api, who: &User, p: &str, overlap: &str) -> (String, Vec<Value>) {
    let wf = workflow(api, who, p, true).await;
    let t = utc("2027-05-05T05:00:00Z");
    let id = schedule(
        api,
        who,
        (p, &wf),
        json!({"cron": "0 0 * * * *", "overlap": overlap}),
        t,
    )
    .await;
    tick(api, t + Duration::seconds(1)).await;
    tick(api, t + Duration::seconds(3601)).await;
    let runs = runs_of(api, who, &id).await;
    let mut runs = runs["items"].as_array().unwrap().clone();
    runs.sort_by_key(|r| r["scheduled_for"].as_str().unwrap().to_string());
    (id, runs)
}

#[tokio::test]
async fn each_overlap_policy_does_what_it_says() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;

    let (id, runs) = overlap_case(&api, &ada, &p, "skip").await;
    assert_eq!(runs.len(), 1);
    let fires = fires(&api, &ada, &id).await;
    assert_eq!(fires[0]["outcome"], "skipped");
    let reason = fires[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("overlap") && reason.contains(runs[0]["id"].as_str().unwrap()),
        "{reason}"
    );

    let (_, runs) = overlap_case(&api, &ada, &p, "allow").await;
    assert_eq!(runs.len(), 2);

    let (_, runs) = overlap_case(&api, &ada, &p, "cancel_previous").await;
    assert_eq!(runs.len(), 2);
    let first = format!("/api/v1/runs/{}", runs[0]["id"].as_str().unwrap());
    crate::common::eventually(async || {
        let run = api
            .call("GET", &first, Some(&ada.access), None)
            .await
            .json();
        (run["status"] == "cancelled").then_some(())
    })
    .await;
    let second = format!("/api/v1/runs/{}", runs[1]["id"].as_str().unwrap());
    crate::common::eventually(async || {
        let run = api
            .call("GET", &second, Some(&ada.access), None)
            .await
            .json();
        (run["status"] == "waiting").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_manual_trigger_starts_a_run_now_within_the_schedules_rules() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let wf = workflow(&api, &ada, &p, true).await;
    let id = schedule(
        &api,
        &ada,
        (&p, &wf),
        json!({"cron": "0 0 1 1 *", "overlap": "skip"}),
        utc("2027-01-01T00:00:00Z"),
    )
    .await;
    let path = format!("/api/v1/schedules/{id}/trigger");
    let res = api.call("POST", &path, Some(&ada.access), None).await;
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let run = res.json();
    let run_id = run["id"].as_str().unwrap();
    assert_eq!(
        res.header("location"),
        Some(format!("/api/v1/runs/{run_id}").as_str())
    );
    let stored = api
        .call(
            "GET",
            &format!("/api/v1/runs/{run_id}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(
        (&stored["schedule_id"], &stored["input"]),
        (&json!(id), &json!({"tag": "nightly"}))
    );
    let fires = fires(&api, &ada, &id).await;
    assert_eq!(
        (
            &fires[0]["outcome"],
            &fires[0]["manual"],
            &fires[0]["run_id"]
        ),
        (&json!("started"), &json!(true), &json!(run_id))
    );
    // The run is still waiting, so the schedule's overlap policy (skip) refuses another,
    // and the refusal changes nothing.
    let before = api.count("runs").await;
    let res = api.call("POST", &path, Some(&ada.access), None).await;
    assert_eq!(res.status, 409);
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    assert_eq!(api.count("runs").await, before);
    // Viewers cannot trigger; other tenants cannot see the schedule.
    let vic = api.register("vic").await;
    api.add_member(&ada, &p, &vic, "viewer").await;
    assert_eq!(
        api.status("POST", &path, Some(&vic.access), None).await,
        403
    );
    let eve = api.register("eve").await;
    assert_eq!(
        api.status("POST", &path, Some(&eve.access), None).await,
        404
    );
    assert_eq!(
        api.status(
            "GET",
            &format!("/api/v1/schedules/{id}/fires"),
            Some(&eve.access),
            None
        )
        .await,
        404
    );
}

#[tokio::test]
async fn a_run_start_policy_refuses_fires_api_starts_and_triggers_alike() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let wf = workflow(&api, &ada, &p, true).await;
    let policy = api
        .create(
            &ada.access,
            "/api/v1/policies",
            json!({"project_id": p, "name": "One at a time", "scope": {"workflow_id": wf},
                "rules": {"max_concurrent_runs": 1}}),
        )
        .await;
    let t = utc("2027-06-01T12:00:00Z");
    let id = schedule(
        &api,
        &ada,
        (&p, &wf),
        json!({"cron": "0 0 * * * *", "overlap": "allow"}),
        t,
    )
    .await;
    tick(&api, t + Duration::seconds(1)).await;
    tick(&api, t + Duration::seconds(3601)).await;
    assert_eq!(fired_for(&api, &ada, &id).await.len(), 1);
    let fires = fires(&api, &ada, &id).await;
    assert_eq!(fires[0]["outcome"], "refused");
    let reason = fires[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("One at a time")
            && reason.contains("max_concurrent_runs")
            && reason.contains(policy["id"].as_str().unwrap()),
        "{reason}"
    );
    // The API's starts and the manual trigger meet the same rule.
    let res = api
        .call(
            "POST",
            "/api/v1/runs",
            Some(&ada.access),
            Some(json!({"workflow_id": wf, "input": {"tag": "x"}})),
        )
        .await;
    assert_eq!(res.status, 403);
    assert_eq!(
        res.json()["type"].as_str().unwrap().rsplit('/').next(),
        Some("policy-violation")
    );
    assert_eq!(
        api.status(
            "POST",
            &format!("/api/v1/schedules/{id}/trigger"),
            Some(&ada.access),
            None
        )
        .await,
        403
    );
    // Another workflow of the project is outside the policy's scope.
    let other = workflow(&api, &ada, &p, false).await;
    let res = api
        .call(
            "POST",
            "/api/v1/runs",
            Some(&ada.access),
            Some(json!({"workflow_id": other, "input": {"tag": "x"}})),
        )
        .await;
    assert_eq!(res.status, 201);
}

#[tokio::test]
async fn a_deleted_project_stops_its_schedules() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let wf = workflow(&api, &ada, &p, false).await;
    let t = utc("2027-07-01T00:00:00Z");
    let id = schedule(&api, &ada, (&p, &wf), json!({"cron": "0 0 * * * *"}), t).await;
    assert_eq!(
        api.status(
            "DELETE",
            &format!("/api/v1/projects/{p}"),
            Some(&ada.access),
            None
        )
        .await,
        204
    );
    tick(&api, t + Duration::seconds(1)).await;
    let db = api.env.db().await;
    let row = db
        .query_one(
            "select enabled, next_fire_at is null, (select count(*) from runs where schedule_id = s.schedule_id),
                    (select reason from schedule_fires where schedule_id = s.schedule_id)
             from schedules s where schedule_id = $1::text::uuid",
            &[&id],
        )
        .await
        .unwrap();
    let (enabled, stopped, runs, reason): (bool, bool, i64, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!((enabled, stopped, runs), (false, true, 0));
    assert!(reason.contains("deleted"), "{reason}");
    // Later ticks find nothing to do.
    tick(&api, t + Duration::seconds(7200)).await;
    let runs: i64 = db
        .query_one("select count(*) from runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(runs, 0);
}

#[tokio::test]
async fn a_paused_schedule_does_not_fire_and_resumes_from_now() {
    let api = Api::start().await;
    let (ada, p) = project(&api).await;
    let wf = workflow(&api, &ada, &p, false).await;
    let t = utc("2027-08-01T00:00:00Z");
    let id = schedule(
        &api,
        &ada,
        (&p, &wf),
        json!({"cron": "0 0 * * * *", "overlap": "allow"}),
        t,
    )
    .await;
    let path = format!("/api/v1/schedules/{id}");
    let res = api
        .call(
            "PATCH",
            &path,
            Some(&ada.access),
            Some(json!({"enabled": false})),
        )
        .await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(
        (&res.json()["enabled"], &res.json()["next_fire_at"]),
        (&json!(false), &Value::Null)
    );
    // Paused, its fire times pass without a run or a record.
    tick(&api, t + Duration::seconds(1)).await;
    tick(&api, t + Duration::seconds(7201)).await;
    assert!(fired_for(&api, &ada, &id).await.is_empty());
    assert!(fires(&api, &ada, &id).await.is_empty());
    // Resumed, it fires from now on: the next full hour, not the missed ones.
    let res = api
        .call(
            "PATCH",
            &path,
            Some(&ada.access),
            Some(json!({"enabled": true})),
        )
        .await;
    assert_eq!(res.status, 200);
    let next = time(&res.json()["next_fire_at"]);
    let now = chrono::Utc::now();
    assert!(next > now && next <= now + Duration::hours(1), "{next}");
    assert_eq!(next.timestamp() % 3600, 0);
}
