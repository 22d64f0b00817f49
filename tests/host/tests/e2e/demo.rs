//! The offline demo `infra/dev up` runs (infra/demo): its loopback model provider and search
//! service, then the seeding script through the public API, against the real app. What the
//! README promises a newcomer: the run succeeds, with the provider's tokens recorded, and a
//! second seeding reuses the account, project and resources.

use std::process::{Command, Stdio};

use crate::common::{Api, TempDir, eventually, free_local_address, workspace};

/// Kills the demo services when the test ends, however it ends.
struct Services(std::process::Child);

impl Drop for Services {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the seeding script (awaited: the app is served by this test's own runtime).
async fn seed(api: &Api, services: &str, data: &std::path::Path) -> (bool, String) {
    let out = tokio::process::Command::new("python3")
        .arg(workspace().join("infra/demo/seed.py"))
        .args([&api.url(""), services])
        .arg(data)
        .output()
        .await
        .expect("python3 runs the seeding script");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn the_offline_demo_seeds_through_the_api_and_its_run_succeeds() {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no python3, which the demo needs (infra/dev up skips it too)");
        return;
    }
    let addr = free_local_address();
    let services = Services(
        Command::new("python3")
            .arg(workspace().join("infra/demo/services.py"))
            .arg(addr.port().to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("the demo services start"),
    );
    let base = format!("http://{addr}");
    // Ready once it accepts connections (Python binds before it serves).
    eventually(async || tokio::net::TcpStream::connect(addr).await.ok()).await;
    let providers = format!("demo={base}/v1");
    let api = Api::start_with(&[
        ("SPIN_VARIABLE_MODEL_PROVIDERS", providers.as_str()),
        ("SPIN_VARIABLE_TOOLS_ALLOW_HTTP", "true"),
        ("SPIN_VARIABLE_TOOLS_ALLOW_PRIVATE_HOSTS", "true"),
    ])
    .await;
    let data = TempDir::new();

    let (ok, first) = seed(&api, &base, data.path()).await;
    assert!(ok, "{first}");
    assert!(
        first.contains("search: succeeded") && first.contains("summarise: succeeded"),
        "{first}"
    );
    let password = std::fs::read_to_string(data.path().join("demo_password")).unwrap();
    assert!(
        first.contains(&format!(
            "{}/console/runs/",
            api.url("").trim_end_matches('/')
        )) && first.contains(&format!(
            "demo@sparkops.local with password {}",
            password.trim()
        )),
        "the console's address and the demo login are printed: {first}"
    );
    let (ok, again) = seed(&api, &base, data.path()).await;
    assert!(ok, "{again}");

    let db = api.env.db().await;
    let count = async |sql: &str| db.query_one(sql, &[]).await.unwrap().get::<_, i64>(0);
    assert_eq!(
        count("select count(*) from users where email = 'demo@sparkops.local'").await,
        1
    );
    assert_eq!(
        count("select count(*) from projects where slug = 'demo'").await,
        1
    );
    assert_eq!(
        count("select count(*) from workflows where name = 'research-digest'").await,
        1
    );
    assert_eq!(
        count("select count(*) from runs where status = 'succeeded'").await,
        2
    );
    // The provider's usage is what the runs recorded, never zero.
    assert!(count("select coalesce(sum(tokens_in), 0)::int8 from run_steps").await > 0);
    drop(services);
}
