//! Where URLs that users set may lead, checked when they are called: a host name is called
//! only where something resolves it and refuses private addresses (the runtime's
//! `block_networks`, or a network the operator declares closed), a literal internal address
//! is refused at call time as at save time, and a redirect is never followed (one to an
//! internal address is `denied`). A guest cannot resolve a name itself under Spin:
//! `conformance::a_guest_cannot_resolve_host_names`.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::{Answer, Api, Client, FakeServer, Reply, User};

/// This machine's own host name, which its `/etc/hosts` points at loopback: a name the URL
/// rules cannot see through, as a hostile name resolving to a private address would be.
async fn loopback_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let addresses: Vec<_> = tokio::net::lookup_host((name.as_str(), 80))
        .await
        .unwrap_or_else(|e| panic!("the host name {name} does not resolve: {e}"))
        .collect();
    assert!(
        !addresses.is_empty() && addresses.iter().all(|a| a.ip().is_loopback()),
        "these tests need the machine's host name ({name}) to resolve to loopback only, as \
         Debian's /etc/hosts makes it: {addresses:?}"
    );
    name
}

/// An app with plain `http` allowed (the fakes speak it) but private addresses refused, as
/// in production; `extra` settings, and `block_networks` when given.
async fn app(extra: &[(&str, &str)], block_networks: Option<&str>) -> Api {
    let mut vars = vec![("SPIN_VARIABLE_TOOLS_ALLOW_HTTP", "true")];
    vars.extend_from_slice(extra);
    let block = block_networks.map(str::to_string);
    Api::start_adjusted(&vars, move |options| {
        if let Some(networks) = block {
            let path = options.runtime_config.clone().expect("a runtime config");
            let mut config = std::fs::read_to_string(&path).unwrap();
            config += &format!("\n[outbound_networking]\nblock_networks = {networks}\n");
            std::fs::write(path, config).unwrap();
        }
    })
    .await
}

async fn owner(api: &Client) -> (User, String) {
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "Agents"})).await;
    (ada, p["id"].as_str().unwrap().to_string())
}

/// `POST /tools/{id}/test` of `tool` with an empty input.
async fn try_tool(api: &Client, who: &User, tool: &Value) -> Reply {
    api.call(
        "POST",
        &format!("/api/v1/tools/{}/test", tool["id"].as_str().unwrap()),
        Some(&who.access),
        Some(json!({"input": {}})),
    )
    .await
}

/// Saves a tool calling `url` and calls it through `POST /tools/{id}/test`.
async fn test_call(api: &Client, who: &User, p: &str, url: &str) -> Value {
    let name = format!("lookup_{}", uuid::Uuid::new_v4().simple());
    let tool = crate::engine::tool_named(api, who, p, &name, url.to_string()).await;
    let res = try_tool(api, who, &tool).await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    res.json()
}

#[tokio::test]
async fn a_host_name_is_called_only_where_something_checks_where_it_points() {
    let name = loopback_name().await;
    let fake = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let url = format!("http://{name}:{}/lookup", fake.addr.port());

    // Nothing resolves the name and refuses private addresses: neither the tool's test
    // call nor a run's step reaches the address the name points at.
    let api = app(&[], None).await;
    let (ada, p) = owner(&api).await;
    let answer = test_call(&api, &ada, &p, &url).await;
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["error"]["kind"], "denied");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{name} is a host name and nothing here checks")),
        "{message}"
    );
    let tool = crate::engine::tool_named(&api, &ada, &p, "step", url.clone()).await;
    let wf = crate::engine::workflow(
        &api,
        &ada,
        &p,
        json!([{"key": "fetch", "kind": "tool", "tool_id": tool["id"], "input": {}}]),
    )
    .await;
    let run = api.run_to_end(&ada.access, &wf, json!({})).await;
    assert_eq!(run["status"], "failed", "{run}");
    let steps = api.run_items(&ada.access, &run, "steps").await;
    assert_eq!(steps[0]["error"]["kind"], "policy-violation", "{steps:?}");
    assert_eq!(
        steps[0]["attempt"], 1,
        "a refused destination is not retried"
    );
    assert!(fake.received().is_empty());

    // The runtime refuses private networks (`block_networks`; here a list that spares the
    // test's own Redis): the name goes out, and the runtime judges what it resolves to,
    // here an address it does not block.
    let guarded = app(&[], Some("[\"0.0.0.0/8\", \"169.254.0.0/16\"]")).await;
    let (bob, q) = owner(&guarded).await;
    let answer = test_call(&guarded, &bob, &q, &url).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(fake.received().len(), 1);

    // The operator declares the network closed (a NetworkPolicy): the name goes out.
    let declared = app(&[("SPIN_VARIABLE_NETWORK_BLOCKS_PRIVATE", "true")], None).await;
    let (cy, r) = owner(&declared).await;
    let answer = test_call(&declared, &cy, &r, &url).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(fake.received().len(), 2);
}

#[tokio::test]
async fn a_redirect_is_never_followed_and_one_to_an_internal_address_is_denied() {
    let name = loopback_name().await;
    let redirect = |to: &str| Answer {
        status: 302,
        body: json!({}),
        headers: vec![("location", to.to_string())],
    };
    let fake = FakeServer::answering(
        vec![
            redirect("http://169.254.169.254/latest/meta-data/"),
            redirect("//[::ffff:127.0.0.1]/admin"),
            redirect("https://api.example.com/moved"),
        ],
        Duration::ZERO,
    )
    .await;
    let url = format!("http://{name}:{}/lookup", fake.addr.port());
    let api = app(&[("SPIN_VARIABLE_NETWORK_BLOCKS_PRIVATE", "true")], None).await;
    let (ada, p) = owner(&api).await;

    for internal in ["169.254.169.254", "[::ffff:7f00:1]"] {
        let answer = test_call(&api, &ada, &p, &url).await;
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["error"]["kind"], "denied", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!(
                "answered 302 with a redirect to an internal address ({internal}), not followed"
            )),
            "{message}"
        );
    }
    // A redirect elsewhere is an unsuccessful answer, not followed either.
    let answer = test_call(&api, &ada, &p, &url).await;
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["status"], 302, "{answer}");
    assert_ne!(answer["error"]["kind"], "denied", "{answer}");
    assert_eq!(
        fake.received().len(),
        3,
        "one request per call, none followed"
    );
}

#[tokio::test]
async fn a_url_is_checked_again_when_it_is_called_not_only_when_saved() {
    let name = loopback_name().await;
    let fake = FakeServer::start(200, json!({"ok": true}), Duration::ZERO).await;
    let api = app(&[("SPIN_VARIABLE_NETWORK_BLOCKS_PRIVATE", "true")], None).await;
    let (ada, p) = owner(&api).await;
    let tool = crate::engine::tool_named(
        &api,
        &ada,
        &p,
        "lookup",
        format!("http://{name}:{}/lookup", fake.addr.port()),
    )
    .await;
    // The stored URL changes behind the API's back (a restored backup, a manual fix).
    api.env
        .db()
        .await
        .execute(
            "update tools set url = $1 where tool_id = $2::text::uuid",
            &[
                &fake.url("/lookup"),
                &tool["id"].as_str().unwrap().to_string(),
            ],
        )
        .await
        .unwrap();
    let res = try_tool(&api, &ada, &tool).await;
    assert_eq!(res.status, 422, "{}", String::from_utf8_lossy(&res.body));
    assert!(
        res.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("points at an internal address (127.0.0.1)"),
        "{}",
        res.json()
    );
    assert!(fake.received().is_empty());
}

#[tokio::test]
async fn a_trace_endpoint_naming_a_host_is_guarded_like_a_tool() {
    let name = loopback_name().await;
    let collector = FakeServer::start(200, json!({}), Duration::ZERO).await;
    let endpoint = format!("http://{name}:{}/v1/traces", collector.addr.port());
    for (settings, exported) in [
        (vec![], false),
        (vec![("SPIN_VARIABLE_NETWORK_BLOCKS_PRIVATE", "true")], true),
    ] {
        let api = app(&settings, None).await;
        let (ada, p) = owner(&api).await;
        api.set_trace_endpoint(&ada, &p, &endpoint).await;
        let wf = crate::engine::workflow(
            &api,
            &ada,
            &p,
            json!([{"key": "a", "kind": "condition", "input": {}}]),
        )
        .await;
        let run = api.run_to_end(&ada.access, &wf, json!({})).await;
        // The app's own exporter ticks every 2 s too, and whichever tick claims the export
        // records it: its outcome is awaited.
        api.tick("exporter", chrono::Utc::now().timestamp() + 5)
            .await;
        let export = crate::common::eventually(async || {
            let export = api
                .finished_run(&ada.access, run["id"].as_str().unwrap())
                .await["trace_export"]
                .clone();
            (export["status"] != "pending").then_some(export)
        })
        .await;
        if exported {
            assert_eq!(export["status"], "exported", "{export}");
        } else {
            assert_eq!(export["status"], "failed", "{export}");
            let error = export["last_error"].as_str().unwrap();
            assert!(
                error.contains("is a host name and nothing here checks"),
                "{error}"
            );
        }
    }
    assert_eq!(
        collector.received().len(),
        1,
        "only the guarded app sent it"
    );
}
