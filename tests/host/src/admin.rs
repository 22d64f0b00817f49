//! Administration commands: create an account (and a project it owns) directly in the
//! database, e.g. the first user of a fresh installation. The same rules as the API apply:
//! a valid email, an 8..=128-character password hashed with Argon2id.

use anyhow::{Context, Result, bail};
use sparkops_core::{auth, input};

/// What `create_user` made.
#[derive(Debug)]
pub struct Created {
    pub user_id: String,
    pub project_id: Option<String>,
}

pub async fn create_user(
    database_url: &str,
    email: &str,
    name: &str,
    password: &str,
    project: Option<&str>,
) -> Result<Created> {
    let email = input::Email::parse(email).map_err(|m| anyhow::anyhow!("email {m}"))?;
    input::check_password(password).map_err(|m| anyhow::anyhow!("password {m}"))?;
    if name.trim().is_empty() || name.chars().count() > 200 {
        bail!("name must be 1 to 200 characters");
    }
    let salt: [u8; 16] = *uuid::Uuid::new_v4().as_bytes();
    let hash = auth::hash_password(password, &salt);
    let (mut client, conn) = tokio_postgres::connect(database_url, tokio_postgres::NoTls)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to Postgres ({}): {e}",
                crate::migrate::redact(database_url)
            )
        })?;
    tokio::spawn(conn);
    let tx = client.transaction().await?;
    let user_id = uuid::Uuid::now_v7();
    let inserted = tx
        .execute(
            "insert into users (user_id, email, name, password_hash) values ($1, $2, $3, $4)
             on conflict do nothing",
            &[&user_id, &email.as_str(), &name, &hash],
        )
        .await
        .context("creating the user (are the migrations applied?)")?;
    if inserted == 0 {
        bail!("an account with email {} already exists", email.as_str());
    }
    let project_id = match project {
        Some(project_name) => {
            let id = uuid::Uuid::now_v7();
            let slug = input::Slug::from_name(project_name);
            tx.execute(
                "insert into projects (project_id, owner_id, name, slug) values ($1, $2, $3, $4)",
                &[&id, &user_id, &project_name, &slug.as_str()],
            )
            .await?;
            tx.execute(
                "insert into memberships (project_id, user_id, role) values ($1, $2, 'owner')",
                &[&id, &user_id],
            )
            .await?;
            Some(id.to_string())
        }
        None => None,
    };
    tx.commit().await?;
    Ok(Created {
        user_id: user_id.to_string(),
        project_id,
    })
}
