//! Projects, members and the tenancy matrix, end to end.

use crate::common::{Api, User};
use serde_json::{Value, json};

#[tokio::test]
async fn a_project_is_created_read_updated_and_soft_deleted() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let p = api
        .create_project(
            &ada,
            json!({"name": "Support Agents!", "description": "tier 1"}),
        )
        .await;
    assert_eq!(
        (
            p["slug"].as_str(),
            p["version"].as_i64(),
            p["role"].as_str()
        ),
        (Some("support-agents"), Some(1), Some("owner"))
    );
    let id = p["id"].as_str().unwrap();
    let url = format!("/api/v1/projects/{id}");

    let got = api.call("GET", &url, Some(&ada.access), None).await.json();
    assert_eq!(got, p);

    let stale = crate::common::request(
        "PATCH",
        &api.app.url(&url),
        &[
            ("authorization", &format!("Bearer {}", ada.access)),
            ("if-match", "\"7\""),
        ],
        Some(json!({"name": "Renamed"})),
    )
    .await;
    assert_eq!(stale.status, 412);
    let weak = crate::common::request(
        "PATCH",
        &api.app.url(&url),
        &[
            ("authorization", &format!("Bearer {}", ada.access)),
            ("if-match", "W/\"1\""),
        ],
        Some(json!({"name": "Renamed"})),
    )
    .await;
    assert_eq!(weak.status, 412, "a weak tag never matches");
    let patched = crate::common::request(
        "PATCH",
        &api.app.url(&url),
        &[
            ("authorization", &format!("Bearer {}", ada.access)),
            ("if-match", "\"1\""),
        ],
        Some(json!({"name": "Renamed", "description": null})),
    )
    .await;
    assert_eq!(patched.status, 200);
    let patched = patched.json();
    assert_eq!(
        (patched["name"].as_str(), patched["version"].as_i64()),
        (Some("Renamed"), Some(2))
    );
    assert_eq!(patched["description"], Value::Null);
    assert_eq!(patched["slug"], "support-agents");

    assert_eq!(
        api.status("DELETE", &url, Some(&ada.access), None).await,
        204
    );
    assert_eq!(api.status("GET", &url, Some(&ada.access), None).await, 404);
    let listed = api
        .call("GET", "/api/v1/projects", Some(&ada.access), None)
        .await
        .json();
    assert_eq!(listed["items"], json!([]));
    // Soft: the row is still there.
    assert_eq!(api.count("projects where deleted_at is not null").await, 1);
}

#[tokio::test]
async fn slugs_are_unique_per_owner_and_validated() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let bob = api.register("bob").await;
    api.create_project(&ada, json!({"name": "One", "slug": "shared"}))
        .await;
    let dup = api
        .call(
            "POST",
            "/api/v1/projects",
            Some(&ada.access),
            Some(json!({"name": "Two", "slug": "shared"})),
        )
        .await;
    assert_eq!(dup.status, 409);
    api.create_project(&bob, json!({"name": "Bob's", "slug": "shared"}))
        .await;
    let bad = api
        .call(
            "POST",
            "/api/v1/projects",
            Some(&ada.access),
            Some(json!({"name": "X", "slug": "Bad Slug"})),
        )
        .await;
    assert_eq!(bad.status, 422);
    assert_eq!(bad.json()["errors"][0]["field"], "slug");
    assert_eq!(api.count("projects").await, 2);
}

#[tokio::test]
async fn projects_list_newest_first_in_keyset_pages() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            api.create_project(&ada, json!({"name": format!("p{i}")}))
                .await["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    ids.reverse();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/projects?limit=2&cursor={c}"),
            None => "/api/v1/projects?limit=2".to_string(),
        };
        let page = api.call("GET", &path, Some(&ada.access), None).await.json();
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["id"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    let bad = api
        .call("GET", "/api/v1/projects?limit=500", Some(&ada.access), None)
        .await;
    assert_eq!(bad.status, 422);
}

#[tokio::test]
async fn members_are_added_changed_and_removed_and_the_last_owner_stays() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let bob = api.register("bob").await;
    let p = api.create_project(&ada, json!({"name": "Team"})).await;
    let id = p["id"].as_str().unwrap();
    api.add_member(&ada, id, &bob, "member").await;
    let again = api
        .call(
            "POST",
            &format!("/api/v1/projects/{id}/members"),
            Some(&ada.access),
            Some(json!({"email": bob.email, "role": "viewer"})),
        )
        .await;
    assert_eq!(again.status, 409);

    let members = api
        .call(
            "GET",
            &format!("/api/v1/projects/{id}/members"),
            Some(&bob.access),
            None,
        )
        .await
        .json();
    let roles: Vec<(&str, &str)> = members["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["email"].as_str().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert_eq!(
        roles,
        [
            (ada.email.as_str(), "owner"),
            (bob.email.as_str(), "member")
        ]
    );

    let me = |who: &User| format!("/api/v1/projects/{id}/members/{}", who.id);
    let demote = api
        .call(
            "PATCH",
            &me(&ada),
            Some(&ada.access),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(demote.status, 409, "the last owner cannot be demoted");
    assert_eq!(
        api.status("DELETE", &me(&ada), Some(&ada.access), None)
            .await,
        409,
        "nor leave"
    );

    let promote = api
        .call(
            "PATCH",
            &me(&bob),
            Some(&ada.access),
            Some(json!({"role": "owner"})),
        )
        .await;
    assert_eq!(promote.json()["role"], "owner");
    assert_eq!(
        api.status("DELETE", &me(&ada), Some(&ada.access), None)
            .await,
        204,
        "now ada may leave"
    );
    assert_eq!(
        api.status(
            "GET",
            &format!("/api/v1/projects/{id}"),
            Some(&ada.access),
            None
        )
        .await,
        404
    );

    let unknown = api
        .call(
            "POST",
            &format!("/api/v1/projects/{id}/members"),
            Some(&bob.access),
            Some(json!({"email": "ghost@example.com", "role": "viewer"})),
        )
        .await;
    assert_eq!(unknown.status, 422);
}

#[tokio::test]
async fn only_owners_make_owners() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let adm = api.register("adm").await;
    let eve = api.register("eve").await;
    let id = api.create_project(&ada, json!({"name": "T"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.add_member(&ada, &id, &adm, "admin").await;
    let res = api
        .call(
            "POST",
            &format!("/api/v1/projects/{id}/members"),
            Some(&adm.access),
            Some(json!({"email": eve.email, "role": "owner"})),
        )
        .await;
    assert_eq!(res.status, 403);
    let demote_owner = api
        .call(
            "PATCH",
            &format!("/api/v1/projects/{id}/members/{}", ada.id),
            Some(&adm.access),
            Some(json!({"role": "viewer"})),
        )
        .await;
    assert_eq!(demote_owner.status, 403);
}

/// Every project-scoped route, as (method, path, body) for project `p`, key `k` and a
/// target user `u`.
fn routes(
    p: &str,
    k: &str,
    u: &User,
    newcomer: &User,
) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", format!("/api/v1/projects/{p}"), None),
        (
            "PATCH",
            format!("/api/v1/projects/{p}"),
            Some(json!({"description": "x"})),
        ),
        ("GET", format!("/api/v1/projects/{p}/members"), None),
        (
            "POST",
            format!("/api/v1/projects/{p}/members"),
            Some(json!({"email": newcomer.email, "role": "viewer"})),
        ),
        (
            "PATCH",
            format!("/api/v1/projects/{p}/members/{}", u.id),
            Some(json!({"role": "viewer"})),
        ),
        ("GET", format!("/api/v1/api-keys?project_id={p}"), None),
        (
            "POST",
            "/api/v1/api-keys".into(),
            Some(json!({"name": "k", "project_id": p, "role": "viewer"})),
        ),
        ("DELETE", format!("/api/v1/api-keys/{k}"), None),
        (
            "DELETE",
            format!("/api/v1/projects/{p}/members/{}", u.id),
            None,
        ),
        ("DELETE", format!("/api/v1/projects/{p}"), None),
    ]
}

#[tokio::test]
async fn another_tenant_gets_404_on_every_project_route() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let bob = api.register("bob").await;
    let mallory = api.register("mallory").await;
    let newcomer = api.register("new").await;
    let p = api.create_project(&ada, json!({"name": "Secret"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    api.add_member(&ada, &p, &bob, "member").await;
    let key = api.create_key(&ada, &p, "viewer").await;
    let k = key["id"].as_str().unwrap();
    for (method, path, body) in routes(&p, k, &bob, &newcomer) {
        let res = api.call(method, &path, Some(&mallory.access), body).await;
        assert_eq!(
            res.status,
            404,
            "{method} {path}: {}",
            String::from_utf8_lossy(&res.body)
        );
    }
    // Mallory's own key for her own project reaches nothing of Ada's either.
    let own = api.create_project(&mallory, json!({"name": "Mine"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mkey = api.create_key(&mallory, &own, "admin").await;
    let secret = mkey["secret"].as_str().unwrap();
    for (method, path, body) in routes(&p, k, &bob, &newcomer) {
        let res = api.call(method, &path, Some(secret), body).await;
        assert_eq!(res.status, 404, "key: {method} {path}");
    }
    // Nothing changed.
    assert_eq!(api.count("memberships").await, 3);
    assert_eq!(api.count("api_keys where revoked_at is null").await, 2);
    assert_eq!(api.count("projects where deleted_at is null").await, 2);
}

#[tokio::test]
async fn each_role_gets_exactly_the_actions_of_api_md() {
    // Expected status per route (in `routes` order) for viewer, member, admin.
    let expected: [(&str, [u16; 10]); 3] = [
        ("viewer", [200, 403, 200, 403, 403, 403, 403, 403, 403, 403]),
        ("member", [200, 403, 200, 403, 403, 403, 403, 403, 403, 403]),
        ("admin", [200, 200, 200, 201, 200, 200, 201, 204, 204, 403]),
    ];
    for (role, statuses) in expected {
        let api = Api::start().await;
        let ada = api.register("ada").await;
        let caller = api.register(role).await;
        let target = api.register("target").await;
        let newcomer = api.register("new").await;
        let p = api.create_project(&ada, json!({"name": "R"})).await["id"]
            .as_str()
            .unwrap()
            .to_string();
        api.add_member(&ada, &p, &caller, role).await;
        api.add_member(&ada, &p, &target, "member").await;
        let key = api.create_key(&ada, &p, "viewer").await;
        let k = key["id"].as_str().unwrap();
        for ((method, path, body), want) in
            routes(&p, k, &target, &newcomer).into_iter().zip(statuses)
        {
            let res = api.call(method, &path, Some(&caller.access), body).await;
            assert_eq!(
                res.status,
                want,
                "{role}: {method} {path}: {}",
                String::from_utf8_lossy(&res.body)
            );
        }
    }
}

#[tokio::test]
async fn the_owner_deletes_the_project_and_an_api_key_acts_with_its_role() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let p = api.create_project(&ada, json!({"name": "R"})).await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let viewer_key = api.create_key(&ada, &p, "viewer").await;
    let secret = viewer_key["secret"].as_str().unwrap();
    assert_eq!(
        api.status("GET", &format!("/api/v1/projects/{p}"), Some(secret), None)
            .await,
        200
    );
    let patch = api
        .call(
            "PATCH",
            &format!("/api/v1/projects/{p}"),
            Some(secret),
            Some(json!({"name": "n"})),
        )
        .await;
    assert_eq!(patch.status, 403);
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
    // A deleted project's keys stop working.
    assert_eq!(
        api.status("GET", &format!("/api/v1/projects/{p}"), Some(secret), None)
            .await,
        401
    );
}
