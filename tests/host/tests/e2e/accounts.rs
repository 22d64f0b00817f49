//! Accounts end to end: register, login, refresh rotation and reuse detection, logout,
//! token tampering, API keys, rate limits and bad input, through the real components.

use crate::common::{Api, TEST_JWT_SECRET, column, request};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jwt_simple::prelude::*;
use serde_json::json;

#[tokio::test]
async fn register_then_me_shows_the_account() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let res = api
        .call("GET", "/api/v1/auth/me", Some(&ada.access), None)
        .await;
    assert_eq!(res.status, 200);
    let me = res.json();
    assert_eq!(me["id"], ada.id.as_str());
    assert_eq!(me["email"], ada.email.as_str());
    assert_eq!(me["name"], "ada");
    assert_eq!(me["memberships"], json!([]));
    assert!(me["created_at"].as_str().unwrap().ends_with('Z'));
    assert!(res.header("x-request-id").is_some());
    assert_eq!(res.header("ratelimit-limit"), Some("600"));
}

#[tokio::test]
async fn an_email_registers_once_whatever_its_case() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let res = api
        .call(
            "POST",
            "/api/v1/auth/register",
            None,
            Some(json!({"email": ada.email.to_uppercase(), "password": "another-password", "name": "Ada"})),
        )
        .await;
    assert_eq!(res.status, 409);
    assert_eq!(res.json()["type"], "https://sparkops.dev/problems/conflict");
    assert_eq!(api.count("users").await, 1);
}

#[tokio::test]
async fn login_works_with_json_and_the_oauth2_form() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let res = api
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": ada.email, "password": ada.password})),
        )
        .await;
    assert_eq!(res.status, 200);
    let tokens = res.json();
    assert_eq!(tokens["token_type"], "bearer");
    assert_eq!(tokens["expires_in"], 900);
    let me = api
        .call(
            "GET",
            "/api/v1/auth/me",
            tokens["access_token"].as_str(),
            None,
        )
        .await;
    assert_eq!(me.json()["id"], ada.id.as_str());

    let form = format!(
        "grant_type=password&username={}&password={}",
        ada.email.replace('@', "%40"),
        ada.password
    );
    let res = form_post(&api, "/api/v1/auth/login", &form).await;
    assert_eq!(res.status, 200, "{}", String::from_utf8_lossy(&res.body));
    assert!(res.json()["access_token"].is_string());
}

async fn form_post(api: &Api, path: &str, form: &str) -> crate::common::Reply {
    let headers = [("content-type", "application/x-www-form-urlencoded")];
    crate::common::request_raw(
        "POST",
        &api.app.url(path),
        &headers,
        form.as_bytes().to_vec(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_failed_login_never_tells_whether_the_email_exists() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let wrong_password = api
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": ada.email, "password": "not-her-password"})),
        )
        .await;
    let unknown = api
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "nobody@example.com", "password": "whatever-pw"})),
        )
        .await;
    assert_eq!((wrong_password.status, unknown.status), (401, 401));
    let (a, b) = (wrong_password.json(), unknown.json());
    assert_eq!(
        (a["type"].clone(), a["detail"].clone()),
        (b["type"].clone(), b["detail"].clone())
    );
    assert_eq!(wrong_password.header("www-authenticate"), Some("Bearer"));
}

#[tokio::test]
async fn repeated_login_failures_lock_the_account_for_a_while() {
    let api = Api::start_with(&[("SPIN_VARIABLE_LOGIN_FAILURES_PER_ACCOUNT", "3")]).await;
    let ada = api.register("ada").await;
    for _ in 0..3 {
        let res = api
            .call(
                "POST",
                "/api/v1/auth/login",
                None,
                Some(json!({"email": ada.email, "password": "wrong-password"})),
            )
            .await;
        assert_eq!(res.status, 401);
    }
    let res = api
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": ada.email, "password": ada.password})),
        )
        .await;
    assert_eq!(res.status, 429);
    assert!(res.header("retry-after").unwrap().parse::<u64>().unwrap() > 0);
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_whole_family() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let refresh = async |t: &str| api.refresh(t).await;

    let first = refresh(&ada.refresh).await;
    assert_eq!(first.status, 200);
    let rt2 = first.json()["refresh_token"].as_str().unwrap().to_string();
    assert_ne!(rt2, ada.refresh);
    assert_eq!(
        api.status(
            "GET",
            "/api/v1/auth/me",
            first.json()["access_token"].as_str(),
            None
        )
        .await,
        200
    );

    // The rotated token comes back: the family is revoked, the newer token with it.
    let reuse = refresh(&ada.refresh).await;
    assert_eq!(reuse.status, 401);
    assert!(reuse.json()["detail"].as_str().unwrap().contains("revoked"));
    assert_eq!(refresh(&rt2).await.status, 401);

    // Another login is another family, unaffected.
    let login = api
        .call(
            "POST",
            "/api/v1/auth/login",
            None,
            Some(json!({"email": ada.email, "password": ada.password})),
        )
        .await
        .json();
    assert_eq!(
        refresh(login["refresh_token"].as_str().unwrap())
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn concurrent_refreshes_of_one_token_rotate_it_once() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let url = api.app.url("/api/v1/auth/refresh");
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let (url, t) = (url.clone(), ada.refresh.clone());
            tokio::spawn(async move {
                request("POST", &url, &[], Some(json!({"refresh_token": t})))
                    .await
                    .status
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [200, 401, 401, 401]);
}

#[tokio::test]
async fn logout_ends_the_session() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let res = api.logout(&ada, &ada.refresh).await;
    assert_eq!(res.status, 204);
    let again = api.refresh(&ada.refresh).await;
    assert_eq!(again.status, 401);
}

#[tokio::test]
async fn logout_cannot_end_someone_elses_session() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let bob = api.register("bob").await;
    let res = api.logout(&bob, &ada.refresh).await;
    assert_eq!(res.status, 204);
    let still = api.refresh(&ada.refresh).await;
    assert_eq!(still.status, 200);
}

// ---- Token tampering ------------------------------------------------------------------------

fn forge(header: &serde_json::Value, claims: &serde_json::Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(signature)
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn signed(claims: JWTClaims<NoCustomClaims>) -> String {
    HS256Key::from_bytes(TEST_JWT_SECRET.as_bytes())
        .authenticate(claims)
        .unwrap()
}

fn claims_for(user_id: &str) -> JWTClaims<NoCustomClaims> {
    Claims::create(Duration::from_mins(5))
        .with_issuer("sparkops")
        .with_audience("sparkops-api")
        .with_subject(user_id)
        .with_jwt_id("t")
}

#[tokio::test]
async fn tampered_tokens_are_401() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let me = async |token: &str| api.me_status(token).await;

    // Control: a token we sign the way the app does is accepted.
    assert_eq!(me(&signed(claims_for(&ada.id))).await, 200);

    let body = json!({"sub": ada.id, "iss": "sparkops", "aud": "sparkops-api", "jti": "t", "exp": now() + 300});
    assert_eq!(
        me(&forge(&json!({"alg": "none", "typ": "JWT"}), &body, b"")).await,
        401,
        "alg none"
    );

    let real = signed(claims_for(&ada.id));
    let signature = B64.decode(real.rsplit('.').next().unwrap()).unwrap();
    assert_eq!(
        me(&forge(
            &json!({"alg": "EdDSA", "typ": "JWT"}),
            &body,
            &signature
        ))
        .await,
        401,
        "EdDSA"
    );

    let (head, sig) = real.rsplit_once('.').unwrap();
    let mut flipped = B64.decode(sig).unwrap();
    flipped[5] ^= 0x40;
    assert_eq!(
        me(&format!("{head}.{}", B64.encode(flipped))).await,
        401,
        "flipped byte"
    );

    let mut expired = claims_for(&ada.id);
    expired.issued_at = Some(UnixTimeStamp::from_secs(now() - 3600));
    expired.expires_at = Some(UnixTimeStamp::from_secs(now() - 1800));
    assert_eq!(me(&signed(expired)).await, 401, "expired");

    let mut early = claims_for(&ada.id);
    early.invalid_before = Some(UnixTimeStamp::from_secs(now() + 3600));
    assert_eq!(me(&signed(early)).await, 401, "not yet valid");

    let other_audience = claims_for(&ada.id).with_audience("billing");
    assert_eq!(me(&signed(other_audience)).await, 401, "other audience");

    let other_key = HS256Key::from_bytes(b"another-secret-0123456789abcdef0123456789")
        .authenticate(claims_for(&ada.id))
        .unwrap();
    assert_eq!(me(&other_key).await, 401, "other key");

    assert_eq!(me("not.a.token").await, 401);
    let res = api.call("GET", "/api/v1/auth/me", None, None).await;
    assert_eq!(
        (res.status, res.header("www-authenticate")),
        (401, Some("Bearer"))
    );
}

// ---- Rate limits -----------------------------------------------------------------------------

#[tokio::test]
async fn the_per_principal_limit_holds_under_concurrent_requests() {
    let api = Api::start_with(&[("SPIN_VARIABLE_RATE_LIMIT_PER_MINUTE", "5")]).await;
    let ada = api.register("ada").await;
    let url = api.app.url("/api/v1/auth/me");
    let auth = format!("Bearer {}", ada.access);
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let (url, auth) = (url.clone(), auth.clone());
            tokio::spawn(
                async move { request("GET", &url, &[("authorization", &auth)], None).await },
            )
        })
        .collect();
    let mut ok = 0;
    let mut limited = 0;
    for c in calls {
        let res = c.await.unwrap();
        match res.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert!(res.header("retry-after").is_some());
                assert_eq!(res.header("ratelimit-remaining"), Some("0"));
                assert_eq!(
                    res.json()["type"],
                    "https://sparkops.dev/problems/rate-limited"
                );
            }
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!((ok, limited), (5, 7));
}

#[tokio::test]
async fn the_per_ip_limit_applies_before_authentication() {
    let api = Api::start_with(&[("SPIN_VARIABLE_RATE_LIMIT_IP_PER_MINUTE", "3")]).await;
    // The per-IP counter is shared with every other test calling from 127.0.0.1, so the
    // exact count is unknown here; what must hold is that the limit bites, unauthenticated.
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(api.status("GET", "/api/v1/auth/me", None, None).await);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 401 || *s == 429),
        "{statuses:?}"
    );
}

// ---- Bad input -------------------------------------------------------------------------------

#[tokio::test]
async fn bad_registrations_are_typed_422s_and_write_nothing() {
    let api = Api::start().await;
    let cases = [
        (
            json!({"email": "ada@example.com", "password": "long-enough"}),
            vec!["name"],
        ),
        (
            json!({"email": "not-an-email", "password": "long-enough", "name": "A"}),
            vec!["email"],
        ),
        (
            json!({"email": "ada@example.com", "password": "short", "name": "A"}),
            vec!["password"],
        ),
        (
            json!({"email": "ada@example.com", "password": 12345678, "name": "A"}),
            vec!["password"],
        ),
        (
            json!({"email": "ada@example.com", "password": "long-enough", "name": "x".repeat(201)}),
            vec!["name"],
        ),
        (
            json!({"email": "ada@example.com", "password": "long-enough", "name": "A", "admin": true}),
            vec!["admin"],
        ),
        (json!([1, 2]), vec!["body"]),
    ];
    for (body, fields) in cases {
        let res = api
            .call("POST", "/api/v1/auth/register", None, Some(body.clone()))
            .await;
        assert_eq!(res.status, 422, "{body}");
        assert_eq!(res.header("content-type"), Some("application/problem+json"));
        let problem = res.json();
        assert_eq!(problem["type"], "https://sparkops.dev/problems/validation");
        let got: Vec<&str> = problem["errors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["field"].as_str().unwrap())
            .collect();
        assert_eq!(got, fields, "{body}");
    }
    assert_eq!(api.count("users").await, 0);
}

#[tokio::test]
async fn malformed_json_and_oversized_bodies_are_refused() {
    let api = Api::start().await;
    let url = api.app.url("/api/v1/auth/register");
    let raw = async |body: Vec<u8>| {
        let headers = [("content-type", "application/json")];
        crate::common::request_raw("POST", &url, &headers, body)
            .await
            .map(|r| r.status)
            .unwrap()
    };
    assert_eq!(raw(b"{\"email\": ".to_vec()).await, 422);
    let mut big = b"{\"name\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'x', (1 << 20) + 10));
    big.extend(b"\"}");
    assert_eq!(raw(big).await, 413);
    assert_eq!(api.count("users").await, 0);
}

// ---- API keys --------------------------------------------------------------------------------

async fn project_of(api: &Api, owner: &crate::common::User) -> String {
    let project = api.create_project(owner, json!({"name": "Agents"})).await;
    project["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn an_api_key_is_shown_once_works_both_ways_and_stops_when_revoked() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let project = project_of(&api, &ada).await;
    let res = api
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(&ada.access),
            Some(json!({"name": "ci", "project_id": project, "role": "member"})),
        )
        .await;
    assert_eq!(res.status, 201, "{}", String::from_utf8_lossy(&res.body));
    let key = res.json();
    let secret = key["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with(key["prefix"].as_str().unwrap()));
    assert_eq!(
        res.header("location"),
        Some(format!("/api/v1/api-keys/{}", key["id"].as_str().unwrap()).as_str())
    );

    // Stored only as a hash.
    let stored: i64 = api
        .env
        .db()
        .await
        .query_one(
            "select count(*) from api_keys where key_hash = $1",
            &[&secret],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);

    let listed = api
        .call(
            "GET",
            &format!("/api/v1/api-keys?project_id={project}"),
            Some(&ada.access),
            None,
        )
        .await
        .json();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert!(listed["items"][0].get("secret").is_none());
    assert_eq!(listed["next_cursor"], serde_json::Value::Null);

    let bearer = api
        .call("GET", "/api/v1/auth/me", Some(&secret), None)
        .await;
    assert_eq!(bearer.status, 200);
    assert_eq!(
        bearer.json()["memberships"],
        json!([{"project_id": project, "role": "owner"}])
    );
    let header = request(
        "GET",
        &api.app.url("/api/v1/auth/me"),
        &[("x-api-key", &secret)],
        None,
    )
    .await;
    assert_eq!(header.status, 200);

    let id = key["id"].as_str().unwrap();
    let revoked = api
        .call(
            "DELETE",
            &format!("/api/v1/api-keys/{id}"),
            Some(&ada.access),
            None,
        )
        .await;
    assert_eq!(revoked.status, 204);
    assert_eq!(api.me_status(&secret).await, 401);
}

#[tokio::test]
async fn an_expired_api_key_is_refused() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let project = project_of(&api, &ada).await;
    let key = api.create_key(&ada, &project, "viewer").await;
    let secret = key["secret"].as_str().unwrap();
    assert_eq!(api.me_status(secret).await, 200);
    api.env
        .db()
        .await
        .execute(
            "update api_keys set expires_at = now() - interval '1 second'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(api.me_status(secret).await, 401);
}

#[tokio::test]
async fn keys_cannot_outrank_their_creator_or_mint_keys() {
    let api = Api::start().await;
    let ada = api.register("ada").await;
    let project = project_of(&api, &ada).await;
    let past = api
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(&ada.access),
            Some(json!({"name": "x", "project_id": project, "role": "admin", "expires_at": "2000-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(past.status, 422);
    let key = api.create_key(&ada, &project, "admin").await;
    let secret = key["secret"].as_str().unwrap();
    let minted = api
        .call(
            "POST",
            "/api/v1/api-keys",
            Some(secret),
            Some(json!({"name": "y", "project_id": project, "role": "viewer"})),
        )
        .await;
    assert_eq!(minted.status, 403);
}

/// A new user's request for a member key in her project: `(url, body, authorization)`.
async fn key_request(api: &Api) -> (String, serde_json::Value, String) {
    let ada = api.register("ada").await;
    let project = project_of(api, &ada).await;
    let body = json!({"name": "ci", "project_id": project, "role": "member"});
    (
        api.app.url("/api/v1/api-keys"),
        body,
        format!("Bearer {}", ada.access),
    )
}

#[tokio::test]
async fn an_idempotent_key_creation_returns_the_first_response() {
    let api = Api::start().await;
    let (url, body, auth) = key_request(&api).await;
    let headers = [
        ("authorization", auth.as_str()),
        ("idempotency-key", "abc-1"),
    ];
    let first = request("POST", &url, &headers, Some(body.clone())).await;
    let second = request("POST", &url, &headers, Some(body.clone())).await;
    assert_eq!((first.status, second.status), (201, 201));
    assert_eq!(first.json(), second.json());
    assert_eq!(second.header("idempotent-replayed"), Some("true"));
    assert_eq!(api.count("api_keys").await, 1);
    // The reply kept for the replay holds the key sealed, never in clear.
    let secret = first.json()["secret"].as_str().unwrap().to_string();
    assert!(secret.len() > 20, "{secret}");
    let kept: Vec<String> = column(
        &api.env.db().await,
        "select response::text from idempotency_keys",
        &[],
    )
    .await;
    assert_eq!(kept.len(), 1);
    assert!(!kept[0].contains(&secret), "{}", kept[0]);
    assert!(kept[0].contains("secret_sealed"), "{}", kept[0]);

    let other = request(
        "POST",
        &url,
        &headers,
        Some(json!({"name": "other", "project_id": body["project_id"], "role": "member"})),
    )
    .await;
    assert_eq!(other.status, 422);
    assert_eq!(api.count("api_keys").await, 1);
}

#[tokio::test]
async fn a_kept_reply_expires_after_its_day_and_the_key_then_makes_a_new_create() {
    let api = Api::start().await;
    let (url, body, auth) = key_request(&api).await;
    let headers = [
        ("authorization", auth.as_str()),
        ("idempotency-key", "day-1"),
    ];
    let first = request("POST", &url, &headers, Some(body.clone())).await;
    assert_eq!(first.status, 201);
    let now = chrono::Utc::now().timestamp();
    // Within its day the sweeper leaves it and a retry is a replay.
    api.tick("sweeper", now + 23 * 3600).await;
    assert_eq!(api.count("idempotency_keys").await, 1);
    let again = request("POST", &url, &headers, Some(body.clone())).await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(api.count("api_keys").await, 1);
    // Past it, the sweeper removes it, and the same key starts a new create.
    api.tick("sweeper", now + 25 * 3600).await;
    assert_eq!(api.count("idempotency_keys").await, 0);
    let later = request("POST", &url, &headers, Some(body)).await;
    assert_eq!(later.status, 201);
    assert_eq!(later.header("idempotent-replayed"), None);
    assert_ne!(later.json()["id"], first.json()["id"]);
    assert_eq!(api.count("api_keys").await, 2);
}

// ---- CORS ------------------------------------------------------------------------------------

#[tokio::test]
async fn cors_preflight_and_responses_name_only_allowed_origins() {
    let api = Api::start_with(&[(
        "SPIN_VARIABLE_CORS_ALLOWED_ORIGINS",
        "https://app.example.com, https://other.example",
    )])
    .await;
    let url = api.app.url("/api/v1/auth/me");
    let preflight = request(
        "OPTIONS",
        &url,
        &[
            ("origin", "https://app.example.com"),
            ("access-control-request-method", "GET"),
        ],
        None,
    )
    .await;
    assert_eq!(preflight.status, 204);
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(
        preflight
            .header("access-control-allow-headers")
            .unwrap()
            .contains("authorization")
    );

    let stranger = request(
        "OPTIONS",
        &url,
        &[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "GET"),
        ],
        None,
    )
    .await;
    assert_eq!(stranger.header("access-control-allow-origin"), None);
    assert_eq!(stranger.header("access-control-allow-methods"), None);

    let actual = request("GET", &url, &[("origin", "https://other.example")], None).await;
    assert_eq!(actual.status, 401);
    assert_eq!(
        actual.header("access-control-allow-origin"),
        Some("https://other.example")
    );
    assert_eq!(actual.header("vary"), Some("Origin"));
}
