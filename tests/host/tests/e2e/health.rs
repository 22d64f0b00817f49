//! The `health` component end to end: the real spin.toml, real Postgres and Redis.

use crate::common::process::OwnRedis;
use crate::common::{TestEnv, eventually, get, request};
use serde_json::json;
use sparkops_host::RunningApp;

async fn start(env: &TestEnv, redis_url: &str) -> RunningApp {
    let config = format!("[key_value_store.default]\ntype = \"redis\"\nurl = \"{redis_url}\"\n");
    let mut options = env.options("spin.toml", Some(&config));
    options
        .env
        .insert("SPIN_VARIABLE_REDIS_URL".into(), redis_url.into());
    options.env.insert(
        "SPIN_VARIABLE_REDIS_HOST".into(),
        TestEnv::host_port(redis_url),
    );
    RunningApp::start(&options).await.expect("the app starts")
}

#[tokio::test]
async fn healthz_is_ok_with_a_request_id() {
    let env = TestEnv::new().await;
    let app = start(&env, &env.redis_url).await;
    let res = get(&app, "/healthz").await;
    assert_eq!(res.status, 200);
    assert_eq!(res.json(), json!({"status": "ok"}));
    assert_eq!(res.header("x-request-id").map(str::len), Some(32));

    let echoed = request(
        "GET",
        &app.url("/healthz"),
        &[("x-request-id", "trace-42")],
        None,
    )
    .await;
    assert_eq!(echoed.header("x-request-id"), Some("trace-42"));
    let insane = request(
        "GET",
        &app.url("/healthz"),
        &[("x-request-id", "a b\tc")],
        None,
    )
    .await;
    assert_ne!(insane.header("x-request-id"), Some("a b\tc"));
}

#[tokio::test]
async fn readyz_is_ready_when_every_dependency_is_up() {
    let env = TestEnv::new().await;
    let app = start(&env, &env.redis_url).await;
    let res = get(&app, "/readyz").await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(
        res.json(),
        json!({"status": "ready", "checks": {"postgres": "up", "key_value": "up", "redis": "up"}})
    );
}

#[tokio::test]
async fn readyz_is_a_503_problem_naming_redis_while_redis_is_stopped() {
    let env = TestEnv::new().await;
    let redis = OwnRedis::start().await;
    let app = start(&env, &redis.url).await;
    assert_eq!(get(&app, "/readyz").await.status, 200);

    let url = redis.url.clone();
    drop(redis);
    let res = get(&app, "/readyz").await;
    assert_eq!(res.status, 503);
    assert_eq!(res.header("content-type"), Some("application/problem+json"));
    let body = res.json();
    assert_eq!(body["type"], "https://sparkops.dev/problems/unavailable");
    assert_eq!(body["status"], 503);
    assert_eq!(body["detail"], "not ready: key_value, redis down");
    assert_eq!(
        body["checks"],
        json!({"postgres": "up", "key_value": "down", "redis": "down"})
    );
    assert_eq!(body["instance"], "/readyz");
    assert!(
        !body.to_string().contains(&url),
        "the problem does not leak addresses"
    );

    // Back up on the same address: readiness recovers without a restart of the app.
    let port = url::Url::parse(&url).unwrap().port().unwrap();
    let _redis = OwnRedis::start_on(port).await;
    eventually(async || (get(&app, "/readyz").await.status == 200).then_some(())).await;
}

#[tokio::test]
async fn a_lost_redis_subscription_ends_the_app_with_the_error_as_spin_does() {
    let env = TestEnv::new().await;
    let redis = OwnRedis::start().await;
    let app = start(&env, &redis.url).await;
    let waiting =
        tokio::time::timeout(std::time::Duration::from_millis(500), app.trigger_failure()).await;
    assert!(
        waiting.is_err(),
        "no failure while Redis is up: {waiting:?}"
    );
    let url = redis.url.clone();
    drop(redis);
    let why = tokio::time::timeout(std::time::Duration::from_secs(10), app.trigger_failure())
        .await
        .expect("the trigger reports the lost subscription");
    assert_eq!(why, format!("disconnected from {url}"));
}

#[tokio::test]
async fn a_request_that_cannot_reach_the_database_is_a_503_to_retry_not_a_500() {
    let env = TestEnv::new().await;
    // A loopback port nothing listens on: the components' database is down (the host's
    // own migrations ran against the test's database before).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut options = env.options("spin.toml", None);
    options.env.insert(
        "SPIN_VARIABLE_DATABASE_URL".into(),
        format!("postgres://sparkops@127.0.0.1:{port}/sparkops"),
    );
    options.env.insert(
        "SPIN_VARIABLE_DATABASE_HOST".into(),
        format!("127.0.0.1:{port}"),
    );
    let app = RunningApp::start(&options).await.expect("the app starts");
    let res = request(
        "POST",
        &app.url("/api/v1/auth/login"),
        &[],
        Some(json!({"email": "ada@example.com", "password": "correct horse battery"})),
    )
    .await;
    assert_eq!(res.status, 503, "{}", String::from_utf8_lossy(&res.body));
    assert_eq!(res.header("retry-after"), Some("2"));
    let body = res.json();
    assert_eq!(body["type"], "https://sparkops.dev/problems/unavailable");
    assert!(
        !body.to_string().contains("127.0.0.1"),
        "the problem does not leak the address: {body}"
    );
}

#[tokio::test]
async fn readyz_answers_503_rather_than_hang_while_redis_is_unresponsive() {
    let env = TestEnv::new().await;
    let redis = OwnRedis::start().await;
    let app = start(&env, &redis.url).await;
    assert_eq!(get(&app, "/readyz").await.status, 200);
    // Redis accepts and says nothing for 8 s (every client paused).
    let mut admin = redis::Client::open(redis.url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(8000)
        .query_async(&mut admin)
        .await
        .unwrap();
    // The check gives up on the silent server and says so, within the pause.
    let res = get(&app, "/readyz").await;
    assert_eq!(res.status, 503);
    assert_eq!(res.json()["checks"]["key_value"], "down");
    let _: () = redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query_async(&mut admin)
        .await
        .unwrap();
    eventually(async || (get(&app, "/readyz").await.status == 200).then_some(())).await;
}

#[tokio::test]
async fn readyz_names_postgres_when_the_database_is_not_migrated() {
    let env = TestEnv::new().await;
    env.db()
        .await
        .batch_execute("drop table service_probe")
        .await
        .unwrap();
    let app = start(&env, &env.redis_url).await;
    let res = get(&app, "/readyz").await;
    assert_eq!(res.status, 503);
    assert_eq!(res.json()["detail"], "not ready: postgres down");
}

#[tokio::test]
async fn other_methods_are_405_with_allow() {
    let env = TestEnv::new().await;
    let app = start(&env, &env.redis_url).await;
    let res = request("POST", &app.url("/healthz"), &[], Some(json!({}))).await;
    assert_eq!(res.status, 405);
    assert_eq!(res.header("allow"), Some("GET, HEAD"));
    assert_eq!(
        res.json()["type"],
        "https://sparkops.dev/problems/method-not-allowed"
    );
}
