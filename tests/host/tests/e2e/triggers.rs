//! The host's Redis trigger through a real compiled guest and a real Redis: templated
//! addresses and channels, every subscriber of a channel activated, a fresh instance per
//! message, one message at a time per subscription, and a failing handler that does not
//! stop the trigger. Plus the start-up errors of bad trigger settings.

use std::time::Duration;

use crate::common::TestEnv;
use redis::AsyncCommands;
use serde_json::json;
use sparkops_host::RunningApp;

const MANIFEST: &str = "tests/fixtures/triggers/spin.toml";

/// The triggers app subscribed on `channel` (twice) and on [`other`]`(channel)` (once), so
/// no other test's app hears its messages.
async fn start(env: &TestEnv, channel: &str) -> RunningApp {
    let mut options = env.options(MANIFEST, None);
    options
        .env
        .insert("SPIN_VARIABLE_CHANNEL".into(), channel.into());
    options
        .env
        .insert("SPIN_VARIABLE_OTHER_CHANNEL".into(), other(channel));
    RunningApp::start(&options)
        .await
        .expect("the triggers app starts")
}

async fn redis(env: &TestEnv) -> redis::aio::MultiplexedConnection {
    redis::Client::open(env.redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn count(r: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    r.get::<_, Option<i64>>(key).await.unwrap().unwrap_or(0)
}

/// The second channel of the app started on `channel`.
fn other(channel: &str) -> String {
    format!("{channel}-other")
}

/// A channel and tag of this test's own (tests share one Redis).
fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn every_subscriber_handles_each_message_in_a_fresh_instance_one_at_a_time() {
    let env = TestEnv::new().await;
    let channel = unique("jobs");
    let app = start(&env, &channel).await;
    let mut r = redis(&env).await;
    let tag = unique("t");
    for _ in 0..4 {
        let msg = json!({"tag": tag, "sleep_ms": 50}).to_string();
        let _: i64 = r.publish(&channel, msg).await.unwrap();
    }
    assert!(app.wait_idle(Duration::from_secs(20)).await);
    // Two subscriptions on the channel, four messages: eight handler runs.
    assert_eq!(count(&mut r, &format!("{tag}:handled")).await, 8);
    // Each ran in a fresh instance: its own count never passed 1.
    assert_eq!(count(&mut r, &format!("{tag}:instance")).await, 1);
    // And one at a time: no handler found another running.
    assert_eq!(count(&mut r, &format!("{tag}:overlap")).await, 0);
    assert_eq!(app.inner.activity.handled(), 8);
}

#[tokio::test]
async fn a_failing_handler_does_not_stop_the_trigger_and_other_channels_are_separate() {
    let env = TestEnv::new().await;
    let channel = unique("jobs");
    let app = start(&env, &channel).await;
    let mut r = redis(&env).await;
    let tag = unique("t");
    let _: i64 = r
        .publish(&channel, json!({"tag": tag, "fail": true}).to_string())
        .await
        .unwrap();
    let _: i64 = r.publish(&channel, "not json").await.unwrap();
    let _: i64 = r
        .publish(other(&channel), json!({"tag": tag}).to_string())
        .await
        .unwrap();
    let _: i64 = r
        .publish(unique("nobody"), json!({"tag": tag}).to_string())
        .await
        .unwrap();
    assert!(app.wait_idle(Duration::from_secs(20)).await);
    // Only `first` listens on the other channel; the failures were handled and logged, not fatal.
    assert_eq!(count(&mut r, &format!("{tag}:handled")).await, 1);
    let _: i64 = r
        .publish(&channel, json!({"tag": tag}).to_string())
        .await
        .unwrap();
    assert!(app.wait_idle(Duration::from_secs(20)).await);
    assert_eq!(count(&mut r, &format!("{tag}:handled")).await, 3);
}

#[tokio::test]
async fn bad_trigger_settings_are_one_clear_start_up_error() {
    let env = TestEnv::new().await;
    let dir = env.options(MANIFEST, None).state_dir;
    let base = std::fs::read_to_string(crate::common::workspace().join(MANIFEST)).unwrap();
    let target = crate::common::workspace().join("target/wasm32-wasip2/release");
    let health = crate::common::workspace().join("target/wasm32-wasip2/release/health.wasm");
    let cases = [
        (
            base.replace("[application.trigger.redis]\naddress = \"{{ redis_url }}\"\n", ""),
            "has no address",
        ),
        (
            base.replace(
                "channel = \"{{ other_channel }}\"",
                "channel = \"{{ nope }}\"",
            ),
            "refers to `nope`, which is not an application variable",
        ),
        (
            format!("{base}\n[[trigger.cron]]\ncron_expression = \"* * * * *\"\ncomponent = \"first\"\n"),
            "does not export handle-cron-event",
        ),
        (
            base.replace(
                "[component.second]\nsource = \"../../../target/wasm32-wasip2/release/triggers_fixture.wasm\"",
                &format!("[component.second]\nsource = {:?}", health.display().to_string()),
            ),
            "does not export fermyon:spin/inbound-redis",
        ),
    ];
    for (i, (text, want)) in cases.into_iter().enumerate() {
        let text = text.replace(
            "../../../target/wasm32-wasip2/release",
            &target.display().to_string(),
        );
        let manifest = dir.join(format!("spin-{i}.toml"));
        std::fs::write(&manifest, text).unwrap();
        let mut options = env.options(MANIFEST, None);
        options.manifest = manifest;
        options
            .env
            .insert("SPIN_VARIABLE_CHANNEL".into(), "c".into());
        let err = match RunningApp::start(&options).await {
            Ok(_) => panic!("case {i} started"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(want), "case {i}: {err}");
    }
}

#[test]
fn a_cron_expression_needs_the_seconds_field() {
    use sparkops_host::triggers::CronSchedule;
    let err = CronSchedule::parse("sweeper", "*/5 * * * *")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("has 5 fields; the cron trigger takes 6"),
        "{err}"
    );
    assert!(CronSchedule::parse("sweeper", "*/5 * * * * *").is_ok());
    assert!(CronSchedule::parse("sweeper", "61 * * * * *").is_err());
}

// ---- Cron -------------------------------------------------------------------------------

async fn start_cron(env: &TestEnv, tag: &str) -> RunningApp {
    let mut options = env.options("tests/fixtures/cron/spin.toml", None);
    options.env.insert("SPIN_VARIABLE_TAG".into(), tag.into());
    RunningApp::start(&options)
        .await
        .expect("the cron app starts")
}

#[tokio::test]
async fn a_cron_component_is_fired_now_with_a_chosen_time_and_its_error_is_reported() {
    let env = TestEnv::new().await;
    let tag = unique("cron");
    let app = start_cron(&env, &tag).await;
    let mut r = redis(&env).await;
    app.inner.handle_cron("tick", 1_700_000_123).await.unwrap();
    assert_eq!(count(&mut r, &format!("{tag}:last")).await, 1_700_000_123);
    let err = app
        .inner
        .handle_cron("tick", 1_700_000_000)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("a round timestamp"), "{err:#}");
    assert!(app.inner.handle_cron("nope", 1).await.is_err());
}

#[tokio::test]
async fn the_schedule_ticks_on_its_own_with_each_tick_time() {
    let env = TestEnv::new().await;
    let tag = unique("cron");
    let app = start_cron(&env, &tag).await;
    let mut r = redis(&env).await;
    // Every second: within a bounded wait, two ticks have fired, each at a whole second.
    let started = chrono::Utc::now().timestamp();
    crate::common::eventually(async || {
        (count(&mut r, &format!("{tag}:ticks")).await >= 2).then_some(())
    })
    .await;
    let last = count(&mut r, &format!("{tag}:last")).await;
    assert!(
        last > started,
        "the last tick ({last}) is after the start ({started})"
    );
    drop(app);
}

// ---- Service chaining, as Spin 3.6 allows it ---------------------------------------------

async fn fetched(r: &mut redis::aio::MultiplexedConnection, tag: &str) -> String {
    crate::common::eventually(async || {
        r.get::<_, Option<String>>(format!("{tag}:fetch"))
            .await
            .unwrap()
    })
    .await
}

#[tokio::test]
async fn a_redis_triggered_instance_cannot_chain_even_where_a_wildcard_allows_the_host() {
    let env = TestEnv::new().await;
    let channel = unique("jobs");
    let app = start(&env, &channel).await;
    let mut r = redis(&env).await;
    // The network is open to it (`http://*:*`): the app's own route answers.
    let open = unique("t");
    let url = app.url("/web/echo/x");
    let msg = json!({"tag": open, "fetch": url});
    let _: i64 = r.publish(&channel, msg.to_string()).await.unwrap();
    assert_eq!(fetched(&mut r, &open).await, "status 200");
    // A chaining URL is not intercepted outside the HTTP trigger: it goes to the network,
    // where no such host exists, as under Spin.
    let chained = unique("t");
    let msg = json!({"tag": chained, "fetch": "http://web.spin.internal/echo/x"});
    let _: i64 = r.publish(&channel, msg.to_string()).await.unwrap();
    let outcome = fetched(&mut r, &chained).await;
    assert!(outcome.starts_with("error"), "{outcome}");
}

#[tokio::test]
async fn a_cron_triggered_instance_cannot_chain_even_where_a_wildcard_allows_the_host() {
    let env = TestEnv::new().await;
    let tag = unique("cron");
    let mut options = env.options("tests/fixtures/cron/spin.toml", None);
    options.env.insert("SPIN_VARIABLE_TAG".into(), tag.clone());
    options.env.insert(
        "SPIN_VARIABLE_FETCH_URL".into(),
        "http://web.spin.internal/echo/x".into(),
    );
    let app = RunningApp::start(&options)
        .await
        .expect("the cron app starts");
    app.inner.handle_cron("tick", 1_700_000_123).await.unwrap();
    let mut r = redis(&env).await;
    let outcome = fetched(&mut r, &tag).await;
    assert!(outcome.starts_with("error"), "{outcome}");
}

#[tokio::test]
async fn an_app_with_redis_or_cron_triggers_may_not_name_a_chaining_host_anywhere() {
    let env = TestEnv::new().await;
    let dir = env.options(MANIFEST, None).state_dir;
    let target = crate::common::workspace().join("target/wasm32-wasip2/release");
    // Named by the HTTP component (whose trigger supports chaining), by the Redis one, as a
    // wildcard: Spin marks the whole app as needing chaining, and the Redis and cron
    // triggers refuse it.
    let cases = [
        (
            MANIFEST,
            "[component.web.variables]",
            "allowed_outbound_hosts = [\"http://first.spin.internal\"]\n\n[component.web.variables]",
            "redis",
        ),
        (
            MANIFEST,
            "\"http://*:*\"]",
            "\"http://*.spin.internal\"]",
            "redis",
        ),
        (
            "tests/fixtures/cron/spin.toml",
            "\"http://*:*\"]",
            "\"http://web.spin.internal\"]",
            "cron",
        ),
    ];
    for (i, (manifest, from, to, trigger)) in cases.into_iter().enumerate() {
        let text = std::fs::read_to_string(crate::common::workspace().join(manifest)).unwrap();
        assert!(text.contains(from), "case {i}");
        let text = text.replace(from, to).replace(
            "../../../target/wasm32-wasip2/release",
            &target.display().to_string(),
        );
        let path = dir.join(format!("chaining-{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let mut options = env.options(manifest, None);
        options.manifest = path;
        options.env.insert("SPIN_VARIABLE_TAG".into(), "t".into());
        let err = match RunningApp::start(&options).await {
            Ok(_) => panic!("case {i} started"),
            Err(e) => format!("{e:#}"),
        };
        let want = format!(
            "This application requires the following features that are not available in this version of the '{trigger}' trigger: local_service_chaining"
        );
        assert!(err.contains(&want), "case {i}: {err}");
    }
}
