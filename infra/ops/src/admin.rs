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
    let mut client = crate::migrate::connect(database_url).await?;
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

/// What `seed_demo` made (or found, when it had run before).
#[derive(Debug, PartialEq)]
pub struct Demo {
    pub project_id: String,
    pub created: bool,
}

/// The demo workflow: a tool fetches, an agent summarises what it fetched.
fn demo_definition(tool_id: &str, agent_id: &str) -> serde_json::Value {
    serde_json::json!({"steps": [
        {"key": "fetch", "kind": "tool", "tool_id": tool_id, "input": {"query": "{{ input.topic }}"}},
        {"key": "summarise", "kind": "agent", "agent_id": agent_id, "depends_on": ["fetch"],
         "input": {"text": "{{ steps.fetch.output }}"}, "retry": {"max_attempts": 3}},
    ]})
}

/// Gives the account with `email` a "Demo" project with an agent, a tool, a workflow and a
/// (disabled) schedule, so a newcomer sees something on first start. Running it again
/// changes nothing.
pub async fn seed_demo(database_url: &str, email: &str) -> Result<Demo> {
    let mut client = crate::migrate::connect(database_url).await?;
    let tx = client.transaction().await?;
    let user = tx
        .query_opt(
            "select user_id from users where lower(email) = lower($1)",
            &[&email],
        )
        .await?
        .with_context(|| {
            format!("no account has email {email}: create it first with `admin create-user`")
        })?;
    let user_id: uuid::Uuid = user.get(0);
    // Serialise concurrent seeds of one user on the user row.
    tx.execute(
        "select 1 from users where user_id = $1 for update",
        &[&user_id],
    )
    .await?;
    if let Some(row) = tx
        .query_opt(
            "select project_id from projects where owner_id = $1 and slug = 'demo' and deleted_at is null",
            &[&user_id],
        )
        .await?
    {
        let id: uuid::Uuid = row.get(0);
        return Ok(Demo { project_id: id.to_string(), created: false });
    }
    let [project, tool, agent, workflow, schedule] = [(); 5].map(|_| uuid::Uuid::now_v7());
    tx.execute(
        "insert into projects (project_id, owner_id, name, slug, description)
         values ($1, $2, 'Demo', 'demo', 'A tool fetches, an agent summarises: start here.')",
        &[&project, &user_id],
    )
    .await?;
    tx.execute(
        "insert into memberships (project_id, user_id, role) values ($1, $2, 'owner')",
        &[&project, &user_id],
    )
    .await?;
    let input_schema = serde_json::json!({
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]
    });
    tx.execute(
        "insert into tools (tool_id, project_id, name, description, method, url, input_schema)
         values ($1, $2, 'web-search', 'Searches the web (point it at your own search service).', 'POST',
                 'https://search.example.com/v1/search', $3)",
        &[&tool, &project, &input_schema],
    )
    .await?;
    tx.execute(
        "insert into agents (agent_id, project_id, name, description, model, system_prompt)
         values ($1, $2, 'summariser', 'Summarises search results.', 'openai/gpt-4o-mini',
                 'You summarise search results in three sentences, citing sources.')",
        &[&agent, &project],
    )
    .await?;
    tx.execute(
        "insert into agent_tools (agent_id, tool_id, position) values ($1, $2, 0)",
        &[&agent, &tool],
    )
    .await?;
    let definition = demo_definition(&tool.to_string(), &agent.to_string());
    let catalog = sparkops_core::workflow::Catalog {
        agents: [agent.to_string()].into(),
        tools: [tool.to_string()].into(),
    };
    sparkops_core::workflow::validate(&definition, &catalog)
        .map_err(|e| anyhow::anyhow!("the demo workflow is invalid: {e:?}"))?;
    let workflow_input = serde_json::json!({
        "type": "object", "properties": {"topic": {"type": "string"}}, "required": ["topic"]
    });
    tx.execute(
        "insert into workflows (workflow_id, project_id, name, description)
         values ($1, $2, 'research-digest', 'Search a topic and summarise what comes back.')",
        &[&workflow, &project],
    )
    .await?;
    tx.execute(
        "insert into workflow_versions (workflow_id, version, definition, input_schema, created_by)
         values ($1, 1, $2, $3, $4)",
        &[&workflow, &definition, &workflow_input, &user_id],
    )
    .await?;
    // Disabled: it would call a model provider; enable it once one is configured.
    tx.execute(
        "insert into schedules (schedule_id, project_id, workflow_id, cron, timezone, input, enabled)
         values ($1, $2, $3, '0 9 * * MON-FRI', 'Europe/Berlin', $4, false)",
        &[&schedule, &project, &workflow, &serde_json::json!({"topic": "agent orchestration"})],
    )
    .await?;
    tx.commit().await?;
    Ok(Demo {
        project_id: project.to_string(),
        created: true,
    })
}
