//! The `admin create-user` command, checked through the API it prepares for.

use crate::common::Api;
use serde_json::json;
use sparkops_ops::admin;

#[tokio::test]
async fn a_created_user_logs_in_and_owns_its_project() {
    let api = Api::start().await;
    let created = admin::create_user(
        &api.env.database_url,
        "Root@Example.com",
        "Root",
        "a-long-password",
        Some("First Project"),
    )
    .await
    .unwrap();
    let login = api
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "root@example.com", "password": "a-long-password"})),
        )
        .await;
    assert_eq!(login.status, 200);
    let token = login.json()["access_token"].as_str().unwrap().to_string();
    let me = api
        .call("GET", "/api/v1/auth/me", Some(&token), None)
        .await
        .json();
    assert_eq!(me["id"], created.user_id.as_str());
    assert_eq!(
        me["memberships"],
        json!([{"project_id": created.project_id.unwrap(), "role": "owner"}])
    );
    let projects = api
        .call("GET", "/api/v1/projects", Some(&token), None)
        .await
        .json();
    assert_eq!(projects["items"][0]["slug"], "first-project");
}

#[tokio::test]
async fn bad_input_and_duplicates_are_refused_and_write_nothing() {
    let api = Api::start().await;
    let url = &api.env.database_url;
    assert!(
        admin::create_user(url, "not-an-email", "A", "a-long-password", None)
            .await
            .is_err()
    );
    assert!(
        admin::create_user(url, "a@example.com", "A", "short", None)
            .await
            .is_err()
    );
    assert!(
        admin::create_user(url, "a@example.com", "", "a-long-password", None)
            .await
            .is_err()
    );
    admin::create_user(url, "a@example.com", "A", "a-long-password", None)
        .await
        .unwrap();
    let dup = admin::create_user(url, "A@example.com", "A", "a-long-password", Some("P"))
        .await
        .unwrap_err();
    assert!(dup.to_string().contains("already exists"), "{dup}");
    assert_eq!(api.count("users").await, 1);
    assert_eq!(api.count("projects").await, 0);
}

#[tokio::test]
async fn the_demo_is_seeded_once_and_its_owner_sees_it() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let first = admin::seed_demo(&api.env.database_url, &ada.email.to_uppercase())
        .await
        .unwrap();
    let again = admin::seed_demo(&api.env.database_url, &ada.email)
        .await
        .unwrap();
    assert!(first.created && !again.created);
    assert_eq!(first.project_id, again.project_id);
    for table in [
        "projects",
        "agents",
        "tools",
        "agent_tools",
        "workflows",
        "workflow_versions",
        "schedules",
    ] {
        assert_eq!(api.count(table).await, 1, "{table}");
    }
    let projects = api
        .call("GET", "/api/v1/projects", Some(&ada.access), None)
        .await
        .json();
    assert_eq!(projects["items"][0]["slug"], "demo");
    assert_eq!(projects["items"][0]["role"], "owner");
    let missing = admin::seed_demo(&api.env.database_url, "nobody@example.com")
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("no account"), "{missing}");
}
