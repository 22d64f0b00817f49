//! An agent step (API.md "Agents"): OpenAI-compatible chat completions with the agent's
//! tools offered as function tools, the tool calls the model makes run as tool calls of the
//! run and fed back, up to `max_iterations`. Before every model call the policies in scope
//! are checked (allowed models, token limits, steps) and the call's worst-case cost is
//! reserved against every budget; after it, the reservation is settled and the call's
//! tokens and cost are added to the step and the run at once (so a crash later loses no
//! spend), with a `model.called` event. Every tool call is checked against the allowed
//! tools and recorded as a `tool.called` event with its own timing.
//!
//! **Fallbacks**: an agent's `fallback_models` follow its model in a chain. A call that
//! fails the way another model may not (the provider errs or is unreachable, limits the
//! rate, or refuses the prompt as too long for its context) moves to the next model, for
//! that call and the rest of the step, under the same policies and budgets (a fallback
//! the policies do not allow, or no provider serves, is skipped with a `model.skipped`
//! event). Each move is a `model.fallback` event; the model that answered is recorded on
//! the call's `model.called` event and on the step.
//!
//! The provider comes from `model` (`provider/model`): its base URL from the
//! `model_providers` variable, its key from the `model_provider_keys` secret variable,
//! unless the project has a secret `provider.<name>.api_key`. Keys are never logged or
//! recorded.

use std::time::Instant;

use serde_json::{Value, json};
use sparkops_core::db::{Connection as _, Value as V};
use sparkops_core::error::ApiError;
use sparkops_core::llm::{self, Completion, FunctionTool, Price};
use sparkops_core::money::Usd;

use crate::db::Db;
use crate::deltas;
use crate::engine;
use crate::heartbeat;
use crate::mcp;
use crate::outbound::{self, Call, Chosen};
use crate::pipeline::project_secrets;
use crate::policies::{self, RefusedOr, Violation};
use crate::work::Work;
use sparkops_engine::ErrorKind;
use sparkops_engine::step::Failure;

/// Where an agent step runs.
pub struct StepScope<'a> {
    pub project_id: &'a str,
    pub workflow_id: &'a str,
    pub run_id: &'a str,
    pub step_key: &'a str,
    pub agent_id: &'a str,
    /// When the step's time is up: each model call gets what is left.
    pub deadline: Instant,
}

/// How the step ended: its output, or how it failed (with how long the provider asked to
/// wait before another attempt, and whether any attempt could do better).
pub type Outcome = Result<Value, Failure>;

fn fail(kind: ErrorKind, message: impl Into<String>, final_attempt: bool) -> Outcome {
    let failure = Failure::new(kind, message);
    Err(if final_attempt {
        failure.final_attempt()
    } else {
        failure
    })
}

fn violation(ctx: &mut Work, scope: &StepScope, v: &Violation) -> Result<Outcome, ApiError> {
    record_event(ctx, scope, "policy.violation", v.event())?;
    Ok(fail(ErrorKind::PolicyViolation, v.message(), true))
}

/// The largest answer read from a provider.
const MAX_ANSWER_BYTES: usize = 4 << 20;

struct Agent {
    model: String,
    /// Models moved to, in order, when a call fails the way another model may not.
    fallback_models: Vec<String>,
    system_prompt: String,
    max_iterations: i64,
    max_tokens: i64,
    temperature: Option<f64>,
    response_format: Option<Value>,
    /// Whether model calls stream their answers (`step.delta` events while they come).
    stream: bool,
    /// `(function tool, tool id, the tool as tool_call::call takes it)`.
    tools: Vec<(FunctionTool, String, Value)>,
    /// The MCP tools it names, offered or not.
    mcp_tools: Vec<McpTool>,
    /// The MCP servers those tools are on.
    servers: Vec<mcp::Server>,
}

/// An agent's MCP tools and the servers they are on.
type McpTools = (Vec<McpTool>, Vec<mcp::Server>);

/// An MCP tool an agent names.
struct McpTool {
    /// `mcp:<server>/<tool>`, as agents and policies name it.
    reference: String,
    /// As offered to the model (the tool's listed description and `inputSchema`).
    function: FunctionTool,
    /// Index into `Agent::servers`.
    server: usize,
    tool: String,
    /// Whether the server's `allowed_tools` still names it: a tool taken off the list is
    /// not offered, and a call for it is refused.
    allowed: bool,
}

impl Agent {
    /// The functions offered to the model: its HTTP tools, then its allowed MCP tools.
    fn functions(&self) -> Vec<FunctionTool> {
        let http = self.tools.iter().map(|(f, _, _)| f.clone());
        let mcp = self
            .mcp_tools
            .iter()
            .filter(|t| t.allowed)
            .map(|t| t.function.clone());
        http.chain(mcp).collect()
    }
}

/// The agent of the step, or why it cannot run.
fn load_agent(ctx: &mut Work, scope: &StepScope) -> Result<Result<Agent, Failure>, ApiError> {
    let db = ctx.db()?;
    let rows = db.query(
        "select model, system_prompt, max_iterations, max_tokens, temperature::float8, response_format,
                fallback_models, mcp_tools, stream
         from agents where agent_id = $1 and project_id = $2 and deleted_at is null",
        &[V::Uuid(scope.agent_id.into()), V::Uuid(scope.project_id.into())],
    )?;
    let Some(a) = rows.first() else {
        let message = format!("agent {} no longer exists", scope.agent_id);
        return Ok(Err(
            Failure::new(ErrorKind::Validation, message).final_attempt()
        ));
    };
    let tools = db
        .query(
            "select t.tool_id::text, t.name, t.description, t.input_schema, t.method, t.url, t.headers,
                    t.timeout_ms, t.output_schema
             from agent_tools at join tools t on t.tool_id = at.tool_id
             where at.agent_id = $1 and t.deleted_at is null order by at.position",
            &[V::Uuid(scope.agent_id.into())],
        )?
        .iter()
        .map(|t| {
            let function = FunctionTool {
                name: t.text(1)?,
                description: t.text(2)?,
                parameters: t.json(3)?,
            };
            let call = json!({
                "http": {"method": t.text(4)?, "url": t.text(5)?, "headers": t.json(6)?, "timeout_ms": t.int(7)?},
                "input_schema": t.json(3)?,
                "output_schema": t.json(8)?,
            });
            Ok((function, t.text(0)?, call))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let fallback_models = a
        .json(6)?
        .as_array()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let references: Vec<String> = a
        .json(7)?
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let (mcp_tools, servers) = match load_mcp_tools(ctx, scope, &references)? {
        Ok(loaded) => loaded,
        Err(failure) => return Ok(Err(failure)),
    };
    Ok(Ok(Agent {
        model: a.text(0)?,
        fallback_models,
        system_prompt: a.text(1)?,
        max_iterations: a.int(2)?,
        max_tokens: a.int(3)?,
        temperature: a.0.get(4).and_then(|v| match v {
            V::Float64(f) => Some(*f),
            _ => None,
        }),
        response_format: Some(a.json(5)?).filter(|v| !v.is_null()),
        stream: a.bool(8)?,
        tools,
        mcp_tools,
        servers,
    }))
}

/// The MCP tools `references` names and their servers, from each server's listing; a
/// server never listed, or whose listing lacks a named tool, is listed now.
fn load_mcp_tools(
    ctx: &mut Work,
    scope: &StepScope,
    references: &[String],
) -> Result<Result<McpTools, Failure>, ApiError> {
    let parsed: Vec<(&str, &str, &str)> = references
        .iter()
        .filter_map(|r| {
            sparkops_core::mcp::parse_ref(r, false)
                .ok()
                .map(|(s, t)| (r.as_str(), s, t))
        })
        .collect();
    let mut names: Vec<&str> = parsed.iter().map(|(_, s, _)| *s).collect();
    names.sort_unstable();
    names.dedup();
    let mut servers = mcp::load_named(ctx.db()?, scope.project_id, &names)?;
    for name in &names {
        let Some(i) = servers.iter().position(|s| s.name == *name) else {
            let message = format!("the agent names MCP server '{name}', which no longer exists");
            return Ok(Err(
                Failure::new(ErrorKind::Validation, message).final_attempt()
            ));
        };
        let unlisted = parsed
            .iter()
            .any(|(_, s, t)| s == name && servers[i].allows(t) && servers[i].tool(t).is_none());
        if unlisted {
            match mcp::refresh(ctx, scope.project_id, &servers[i])? {
                Ok(listed) => servers[i].tools = Some(listed),
                Err(e) => {
                    let message = format!("MCP server {name}: listing its tools: {e}");
                    return Ok(Err(e.failure(message)));
                }
            }
        }
    }
    let mut tools = Vec::new();
    for (reference, server_name, tool) in parsed {
        let server = servers
            .iter()
            .position(|s| s.name == server_name)
            .expect("every named server was found above");
        let s = &servers[server];
        let allowed = s.allows(tool);
        let listed = s.tool(tool).cloned();
        if allowed && listed.is_none() {
            let message = format!("MCP server {server_name} does not list the tool {tool}");
            return Ok(Err(Failure::new(ErrorKind::ToolError, message)));
        }
        let listed = listed.unwrap_or_else(|| sparkops_core::mcp::ToolInfo {
            name: tool.to_string(),
            description: String::new(),
            input_schema: json!({"type": "object"}),
        });
        tools.push(McpTool {
            reference: reference.to_string(),
            function: FunctionTool {
                name: sparkops_core::mcp::function_name(server_name, tool)
                    .unwrap_or_else(|| reference.to_string()),
                description: listed.description,
                parameters: listed.input_schema,
            },
            server,
            tool: tool.to_string(),
            allowed,
        });
    }
    Ok(Ok((tools, servers)))
}

/// The provider's base URL and key for `provider` in this project.
fn provider(
    ctx: &mut Work,
    project_id: &str,
    provider: &str,
) -> Result<Option<(String, Option<String>)>, ApiError> {
    let providers =
        llm::parse_providers(&crate::variable("model_providers").unwrap_or_default())
            .map_err(|e| ApiError::Internal(format!("the model_providers variable: {e}")))?;
    let Some(p) = providers.into_iter().find(|p| p.name == provider) else {
        return Ok(None);
    };
    let secret = format!("provider.{provider}.api_key");
    let own = project_secrets(ctx, project_id, std::slice::from_ref(&secret))?;
    let key = own.get(&secret).cloned().or_else(|| {
        llm::parse_keys(&crate::variable("model_provider_keys").unwrap_or_default())
            .into_iter()
            .find(|(name, _)| name == provider)
            .map(|(_, k)| k)
    });
    Ok(Some((p.base_url, key)))
}

/// The model's price, the project's own first; `None` when it has none.
pub fn price(db: &Db, project_id: &str, model: &str) -> Result<Option<Price>, ApiError> {
    let rows = db.query(
        "select input_per_mtok::text, output_per_mtok::text from model_prices
         where model = $1 and (project_id = $2 or project_id is null)
         order by project_id nulls last limit 1",
        &[V::Text(model.into()), V::Uuid(project_id.into())],
    )?;
    let Some(r) = rows.first() else {
        return Ok(None);
    };
    Ok(Some(Price {
        input_per_mtok: r.usd(0)?,
        output_per_mtok: r.usd(1)?,
    }))
}

/// Appends an event to the run, under its lock.
fn record_event(ctx: &mut Work, s: &StepScope, kind: &str, data: Value) -> Result<(), ApiError> {
    ctx.transaction(|tx, _| engine::note(tx, s.run_id, kind, Some(s.step_key), data))
}

/// Adds a model call's tokens and cost to the step and the run, with its event, and
/// settles its budget holds, in one transaction: a crash never counts the spend in one
/// place and not the other. A budget the call took past its alert limit gets its
/// `budget.alert` event.
fn record_usage(
    ctx: &mut Work,
    s: &StepScope,
    (model, c, cost): (&str, &Completion, Option<Usd>),
    (reservation, charged, tokens): (&policies::Reservation, Option<Usd>, i64),
    data: Value,
) -> Result<(), ApiError> {
    let usage = engine::step::Usage {
        model,
        tokens_in: c.prompt_tokens as i64,
        tokens_out: c.completion_tokens as i64,
        cost,
        estimated: charged.filter(|_| !c.usage_reported),
    };
    ctx.transaction(|tx, _| {
        engine::step::add_usage(tx, s.run_id, s.step_key, &usage, data)?;
        for alert in policies::settle_in(tx, reservation, charged, tokens)? {
            engine::note(
                tx,
                s.run_id,
                "budget.alert",
                Some(s.step_key),
                alert.event(),
            )?;
        }
        Ok(())
    })
}

/// Runs the agent step with `input` (the rendered step input).
pub fn run(ctx: &mut Work, scope: &StepScope, input: &Value) -> Result<Outcome, ApiError> {
    let mut sessions = mcp::Sessions::default();
    let outcome = run_with(ctx, scope, input, &mut sessions);
    sessions.close();
    outcome
}

fn run_with(
    ctx: &mut Work,
    scope: &StepScope,
    input: &Value,
    sessions: &mut mcp::Sessions,
) -> Result<Outcome, ApiError> {
    let agent = match load_agent(ctx, scope)? {
        Ok(agent) => agent,
        Err(failure) => return Ok(Err(failure)),
    };
    let primary = match resolve(ctx, scope.project_id, &agent.model)? {
        Ok(m) => m,
        Err(why) => return Ok(fail(ErrorKind::Validation, why, true)),
    };
    let policies = policies::in_scope(
        ctx.db()?,
        scope.project_id,
        scope.workflow_id,
        Some(scope.agent_id),
    )?;
    let started = policies::started_steps(ctx.db()?, &policies, scope.run_id)?;
    if let Err(v) = policies::check_steps(&policies, started)
        .and_then(|()| policies::check_model(&policies, &agent.model))
    {
        return violation(ctx, scope, &v);
    }
    // The chain: the model, then each fallback the policies allow and a provider serves.
    let mut models = vec![primary];
    for name in &agent.fallback_models {
        let why = match policies::check_model(&policies, name) {
            Err(v) => v.message(),
            Ok(()) => match resolve(ctx, scope.project_id, name)? {
                Ok(m) => {
                    models.push(m);
                    continue;
                }
                Err(why) => why,
            },
        };
        record_event(
            ctx,
            scope,
            "model.skipped",
            json!({"model": name, "reason": why}),
        )?;
    }
    let mut current = 0;
    let mut messages = Vec::new();
    if !agent.system_prompt.is_empty() {
        messages.push(json!({"role": "system", "content": agent.system_prompt}));
    }
    let user = match input {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    messages.push(json!({"role": "user", "content": user}));
    let mut first_iteration = 1;
    // A step a budget held goes on where it stopped: its conversation so far, the model
    // answering, the iteration whose call was refused; an admin's approval of an `ask`
    // lets that one call pass the budget.
    let mut waived: Option<String> = None;
    if let Some(hold) = take_hold(ctx, scope)? {
        let checkpoint = &hold["checkpoint"];
        if let Some(saved) = checkpoint["messages"].as_array() {
            messages = saved.clone();
            first_iteration = checkpoint["iteration"].as_i64().unwrap_or(1).max(1);
            current = (checkpoint["model"].as_u64().unwrap_or(0) as usize).min(models.len() - 1);
        }
        if hold["resumed"]["approved"] == true {
            waived = hold["policy_id"].as_str().map(str::to_string);
        }
    }
    let functions = agent.functions();
    for iteration in first_iteration..=agent.max_iterations {
        // A step cancelled or taken back meanwhile makes no further calls: nothing it
        // did from here on would be recorded.
        heartbeat::beat();
        if heartbeat::lost() {
            return Ok(fail(
                ErrorKind::Cancelled,
                "the step's lease was lost: stopped before the next call",
                true,
            ));
        }
        // Tokens left under the policies' limits bound this call's max_tokens.
        let used = ctx.db()?.query(
            "select s.tokens_in + s.tokens_out, r.tokens_in + r.tokens_out from run_steps s
             join runs r on r.run_id = s.run_id where s.run_id = $1 and s.step_key = $2",
            &[V::Uuid(scope.run_id.into()), V::Text(scope.step_key.into())],
        )?;
        let (step_used, run_used) = used
            .first()
            .map(|r| Ok::<_, ApiError>((r.int(0)?, r.int(1)?)))
            .transpose()?
            .unwrap_or((0, 0));
        let estimate = llm::estimate_prompt_tokens(&messages, &functions) as i64;
        let max_tokens = match policies::token_room(&policies, step_used, run_used) {
            Err(v) => return violation(ctx, scope, &v),
            Ok(None) => agent.max_tokens,
            Ok(Some(room)) => agent.max_tokens.min(room - estimate).max(1),
        };
        // The model answering so far first; a failure that another model may not have
        // moves to the next one, for this call and the rest of the step.
        let (mut completion, reservation, duration_ms) = loop {
            let m = &models[current];
            match call(
                ctx,
                scope,
                &agent,
                m,
                (&policies, waived.take().as_deref()),
                &messages,
                &functions,
                (estimate, max_tokens, iteration),
            )? {
                Called::Answered {
                    completion,
                    reservation,
                    duration_ms,
                } => break (completion, reservation, duration_ms),
                Called::Refused(v) => {
                    let Some(hold) = &v.hold else {
                        return violation(ctx, scope, &v);
                    };
                    let mut hold = hold.to_json(&v);
                    hold["checkpoint"] =
                        json!({"messages": messages, "iteration": iteration, "model": current});
                    return Ok(Err(Failure::held(v.message(), hold)));
                }
                Called::Failed {
                    failure,
                    another_may,
                } => match models.get(current + 1) {
                    Some(next) if another_may => {
                        record_event(
                            ctx,
                            scope,
                            "model.fallback",
                            json!({"from": m.name, "to": next.name, "kind": failure.kind.as_str(),
                                "error": failure.message, "iteration": iteration}),
                        )?;
                        current += 1;
                    }
                    _ => return Ok(Err(failure)),
                },
            }
        };
        let m = &models[current];
        // A provider that reported no usage (a stream without its final usage chunk) was
        // still paid: the call is recorded as unpriced with estimated tokens, and the
        // budgets are charged the estimate's price, never nothing.
        completion.estimate_missing_usage(estimate as u64);
        let priced = m
            .price
            .map(|p| p.cost(completion.prompt_tokens, completion.completion_tokens));
        let cost = priced.filter(|_| completion.usage_reported);
        let tokens = (completion.prompt_tokens + completion.completion_tokens) as i64;
        let mut data = json!({
            "model": m.name, "fallback": current > 0, "iteration": iteration, "duration_ms": duration_ms,
            "tokens_in": completion.prompt_tokens, "tokens_out": completion.completion_tokens,
            "cost_usd": cost.map(|c| c.to_fixed()), "tool_calls": completion.tool_calls.len(),
        });
        if agent.stream {
            data["stream"] = json!(true);
        }
        if !completion.usage_reported {
            data["usage"] = json!("estimated");
            data["estimated_cost_usd"] = json!(priced.map(|c| c.to_fixed()));
        }
        record_usage(
            ctx,
            scope,
            (&m.name, &completion, cost),
            (&reservation, priced, tokens),
            data,
        )?;
        if completion.tool_calls.is_empty() {
            return Ok(finish(&agent, completion.content.unwrap_or_default()));
        }
        messages.push(completion.message.clone());
        for call in &completion.tool_calls {
            let content = match call_tool(ctx, scope, &agent, &policies, sessions, call)? {
                ToolAnswer::Content(content) => content,
                ToolAnswer::Refused(v) => return violation(ctx, scope, &v),
                ToolAnswer::Failed(failure) => return Ok(Err(failure)),
            };
            messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": content}));
        }
    }
    Ok(fail(
        ErrorKind::MaxIterations,
        format!(
            "the model still asked for tools after {} iterations",
            agent.max_iterations
        ),
        true,
    ))
}

/// A model of the agent's chain, ready to call.
struct Model {
    /// `provider/model`, as agents and policies name it.
    name: String,
    provider: String,
    /// The provider's own name for it (after the slash).
    model: String,
    url: url::Url,
    key: Option<String>,
    price: Option<Price>,
}

/// The provider and price of the model `name`; `Err` saying why it cannot be called.
fn resolve(
    ctx: &mut Work,
    project_id: &str,
    name: &str,
) -> Result<Result<Model, String>, ApiError> {
    let Some((provider_name, model)) = llm::split_model(name) else {
        return Ok(Err(format!("the model `{name}` is not provider/model")));
    };
    let Some((base_url, key)) = provider(ctx, project_id, provider_name)? else {
        return Ok(Err(format!(
            "no provider `{provider_name}` is configured (model_providers)"
        )));
    };
    let url = url::Url::parse(&format!("{base_url}/chat/completions"))
        .map_err(|e| ApiError::Internal(format!("provider {provider_name}: {e}")))?;
    Ok(Ok(Model {
        name: name.to_string(),
        provider: provider_name.to_string(),
        model: model.to_string(),
        url,
        key,
        price: price(ctx.db()?, project_id, name)?,
    }))
}

/// The hold a budget left on this step, taken (cleared in the same statement): a later
/// attempt of the step starts over rather than from an old checkpoint.
fn take_hold(ctx: &mut Work, scope: &StepScope) -> Result<Option<Value>, ApiError> {
    let rows = ctx.db()?.query(
        "update run_steps s set hold = null from run_steps old
         where s.run_id = $1 and s.step_key = $2 and old.run_id = s.run_id and old.step_key = s.step_key
           and s.hold is not null
         returning old.hold",
        &[V::Uuid(scope.run_id.into()), V::Text(scope.step_key.into())],
    )?;
    Ok(rows.first().map(|r| r.json(0)).transpose()?)
}

/// What one model call came to.
enum Called {
    Answered {
        completion: Completion,
        /// The budget hold, to settle with the call's cost.
        reservation: policies::Reservation,
        duration_ms: u64,
    },
    /// A policy refused the call (a budget).
    Refused(Violation),
    /// The call failed (its hold released); `another_may` when another model might
    /// answer: the provider failed, limited the rate, or found the prompt too long.
    Failed { failure: Failure, another_may: bool },
}

/// One chat completion with model `m`: the worst-case cost reserved against the budgets
/// first, the hold released when the call fails.
#[allow(clippy::too_many_arguments)]
fn call(
    ctx: &mut Work,
    scope: &StepScope,
    agent: &Agent,
    m: &Model,
    (policies, waived): (&[policies::Policy], Option<&str>),
    messages: &[Value],
    functions: &[FunctionTool],
    (estimate, max_tokens, iteration): (i64, i64, i64),
) -> Result<Called, ApiError> {
    let worst = m
        .price
        .map(|p| p.ceiling(estimate as u64, max_tokens as u64));
    // The hold outlives the call's time limit by a margin; past it, the sweeper frees it.
    let left_ms = scope
        .deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as i64;
    let expires_at = chrono::Utc::now() + chrono::Duration::milliseconds(left_ms + 60_000);
    let now = ctx.now;
    let reservation = match policies::reserve(
        ctx.db()?,
        crate::new_id(),
        scope.run_id,
        policies,
        now,
        worst,
        expires_at,
        waived,
    ) {
        Ok(r) => r,
        Err(RefusedOr::Refused(v)) => return Ok(Called::Refused(v)),
        Err(RefusedOr::Error(e)) => return Err(e),
    };
    let mut body = llm::chat_request(
        &m.model,
        messages,
        functions,
        max_tokens as u64,
        agent.temperature,
        agent.response_format.as_ref(),
    );
    if agent.stream {
        body = llm::streamed(body);
    }
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    if let Some(k) = &m.key {
        headers.push(("authorization".into(), format!("Bearer {k}")));
    }
    let failed = |ctx: &mut Work, failure: Failure, another_may: bool| {
        policies::settle(ctx.db()?, &reservation, None, 0)?;
        Ok(Called::Failed {
            failure,
            another_may,
        })
    };
    let left = scope.deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return failed(
            ctx,
            Failure::new(ErrorKind::Timeout, "the step's time ran out"),
            false,
        );
    }
    ctx.release_db();
    let t0 = Instant::now();
    // A streamed answer is read as it comes: its text goes to the run's live view.
    let mut live = agent
        .stream
        .then(|| deltas::Publisher::new(scope.run_id, scope.step_key, iteration));
    let mut reader = llm::StreamReader::default();
    let answer = outbound::send_until(
        Call {
            method: "POST",
            url: &m.url,
            chosen: Chosen::ByOperator,
            headers,
            body: Some(body.to_string().into_bytes()),
            timeout: left,
            max_response_bytes: if agent.stream {
                4 * MAX_ANSWER_BYTES
            } else {
                MAX_ANSWER_BYTES
            },
        },
        |headers, body| {
            if let Some(live) = live.as_mut()
                && is_event_stream(headers)
            {
                let delta = reader.feed(body);
                if !delta.is_empty() {
                    live.push(&delta);
                }
            }
            false
        },
    );
    if let Some(live) = live.as_mut() {
        live.flush();
    }
    let duration_ms = t0.elapsed().as_millis() as u64;
    let provider_name = &m.provider;
    let answer = match answer {
        Err(e) if e.kind() == "timeout" => {
            let message = format!("provider {provider_name}: {e}");
            return failed(ctx, Failure::new(ErrorKind::Timeout, message), false);
        }
        Err(e) => {
            let message = format!("provider {provider_name}: {e}");
            return failed(ctx, Failure::new(ErrorKind::ProviderError, message), true);
        }
        Ok(a) => a,
    };
    if !(200..300).contains(&answer.status) {
        let retry_after = outbound::header(&answer.headers, "retry-after");
        let (kind, wait) = llm::classify(answer.status, retry_after);
        let detail: String = String::from_utf8_lossy(&answer.body)
            .chars()
            .take(300)
            .collect();
        let too_long = llm::is_context_length_refusal(answer.status, &answer.body);
        let another_may =
            too_long || matches!(kind, ErrorKind::ProviderError | ErrorKind::RateLimited);
        let failure = Failure {
            retry_after_ms: wait,
            ..Failure::new(
                kind,
                format!(
                    "provider {provider_name} answered {}: {detail}",
                    answer.status
                ),
            )
        };
        return failed(ctx, failure, another_may);
    }
    let completion = if is_event_stream(&answer.headers) {
        reader.finish(&answer.body)
    } else {
        serde_json::from_slice::<Value>(&answer.body)
            .map_err(|e| e.to_string())
            .and_then(|v| llm::parse_completion(&v))
    };
    match completion {
        Ok(completion) => Ok(Called::Answered {
            completion,
            reservation,
            duration_ms,
        }),
        Err(e) => failed(
            ctx,
            Failure::new(
                ErrorKind::ProviderError,
                format!("provider {provider_name}: not a chat completion: {e}"),
            ),
            true,
        ),
    }
}

/// Whether an answer's `Content-Type` is an event stream.
fn is_event_stream(headers: &[(String, String)]) -> bool {
    outbound::header(headers, "content-type").is_some_and(|v| v.starts_with("text/event-stream"))
}

/// The final answer as the step's output: text, or JSON checked against `response_format`.
fn finish(agent: &Agent, content: String) -> Outcome {
    let Some(schema) = &agent.response_format else {
        return Ok(Value::String(content));
    };
    let parsed: Value = match serde_json::from_str(&content) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                ErrorKind::Validation,
                format!("the answer is not the JSON response_format asks for: {e}"),
                false,
            );
        }
    };
    match sparkops_core::schema::validate_saved(schema, &parsed) {
        Ok(()) => Ok(parsed),
        Err(problems) => fail(
            ErrorKind::Validation,
            format!(
                "the answer does not match response_format: {}",
                problems
                    .iter()
                    .map(|(p, m)| format!("{}: {m}", if p.is_empty() { "/" } else { p }))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            false,
        ),
    }
}

/// The arguments the model gave `call`, or what goes back to it when they are not JSON.
fn arguments_of(call: &llm::ToolCall) -> Result<Value, ToolAnswer> {
    serde_json::from_str(&call.arguments).map_err(|e| {
        ToolAnswer::Content(
            json!({"error": format!("the arguments are not JSON: {e}")}).to_string(),
        )
    })
}

/// What a tool call the model asked for comes to.
enum ToolAnswer {
    /// What goes back to the model (a result, or an error it may correct).
    Content(String),
    /// A policy refuses the call: the step fails.
    Refused(Violation),
    /// The tool's server failed the call (an MCP server's error): the step fails with it.
    Failed(Failure),
}

/// One tool call the model asked for, an HTTP tool or an MCP server's.
fn call_tool(
    ctx: &mut Work,
    scope: &StepScope,
    agent: &Agent,
    policies: &[policies::Policy],
    sessions: &mut mcp::Sessions,
    call: &llm::ToolCall,
) -> Result<ToolAnswer, ApiError> {
    if let Some(tool) = agent
        .mcp_tools
        .iter()
        .find(|t| t.function.name == call.name)
    {
        return call_mcp_tool(ctx, scope, agent, policies, sessions, tool, call);
    }
    let Some((_, tool_id, tool)) = agent.tools.iter().find(|(f, _, _)| f.name == call.name) else {
        record_event(
            ctx,
            scope,
            "tool.called",
            json!({"call_id": call.id, "tool": call.name, "ok": false, "error": "no such tool"}),
        )?;
        return Ok(ToolAnswer::Content(
            json!({"error": format!("there is no tool {}", call.name)}).to_string(),
        ));
    };
    if let Err(v) = policies::check_tool(policies, tool_id) {
        return Ok(ToolAnswer::Refused(v));
    }
    let arguments = match arguments_of(call) {
        Ok(a) => a,
        Err(answer) => return Ok(answer),
    };
    let key = format!("{}:{}:{}", scope.run_id, scope.step_key, call.id);
    let t0 = Instant::now();
    let answer = match crate::tool_call::call(ctx, scope.project_id, tool, &arguments, &key) {
        Ok(a) => a,
        Err(ApiError::Validation { detail, .. }) => {
            json!({"ok": false, "error": {"kind": "validation", "message": detail}})
        }
        Err(e) => return Err(e),
    };
    let duration_ms = t0.elapsed().as_millis() as u64;
    let ok = answer["ok"] == true;
    record_event(
        ctx,
        scope,
        "tool.called",
        json!({"call_id": call.id, "tool": call.name, "tool_id": tool_id, "ok": ok,
            "duration_ms": duration_ms, "status": answer["status"], "error": answer["error"]}),
    )?;
    Ok(ToolAnswer::Content(if ok {
        answer["output"].to_string()
    } else {
        json!({"error": answer["error"]}).to_string()
    }))
}

/// A call of an MCP server's tool: the server's allow-list and the policies first, the
/// arguments against the tool's `inputSchema`, then `tools/call` in the step's session
/// with that server. A result the tool marks as an error goes back to the model; a failed
/// exchange (the server's JSON-RPC error, a timeout, a refused URL) fails the step.
fn call_mcp_tool(
    ctx: &mut Work,
    scope: &StepScope,
    agent: &Agent,
    policies: &[policies::Policy],
    sessions: &mut mcp::Sessions,
    tool: &McpTool,
    call: &llm::ToolCall,
) -> Result<ToolAnswer, ApiError> {
    let server = &agent.servers[tool.server];
    let event = |ok: bool, extra: Value| {
        let mut data = json!({"call_id": call.id, "tool": tool.reference, "mcp_server_id": server.id, "ok": ok});
        for (k, v) in extra.as_object().into_iter().flatten() {
            data[k] = v.clone();
        }
        data
    };
    let refused = |message: String| json!({"error": {"kind": "denied", "message": message}});
    if !tool.allowed {
        let message = format!(
            "{} is not on the allowed_tools of MCP server {}",
            tool.reference, server.name
        );
        record_event(
            ctx,
            scope,
            "tool.called",
            event(false, refused(message.clone())),
        )?;
        return Ok(ToolAnswer::Content(json!({"error": message}).to_string()));
    }
    if let Err(v) = policies::check_tool(policies, &tool.reference) {
        return Ok(ToolAnswer::Refused(v));
    }
    let arguments = match arguments_of(call) {
        Ok(a) => a,
        Err(answer) => return Ok(answer),
    };
    if let Err(problems) = sparkops_core::schema::validate(&tool.function.parameters, &arguments) {
        let message = problems
            .iter()
            .map(|(p, m)| format!("arguments{p}: {m}"))
            .collect::<Vec<_>>()
            .join("; ");
        let error = json!({"error": {"kind": "validation", "message": message}});
        record_event(ctx, scope, "tool.called", event(false, error.clone()))?;
        return Ok(ToolAnswer::Content(error.to_string()));
    }
    let t0 = Instant::now();
    let result = sessions.call_tool(
        ctx,
        scope.project_id,
        server,
        &tool.tool,
        &arguments,
        scope.deadline,
    );
    let duration_ms = t0.elapsed().as_millis() as u64;
    match result {
        Err(mcp::McpError::Internal(e)) => Err(e),
        Err(e) => {
            let message = format!("MCP server {}: tools/call {}: {e}", server.name, tool.tool);
            let error = json!({"duration_ms": duration_ms,
                "error": {"kind": e.kind().as_str(), "message": message}});
            record_event(ctx, scope, "tool.called", event(false, error))?;
            Ok(ToolAnswer::Failed(e.failure(message)))
        }
        Ok((text, is_error)) => {
            let extra = if is_error {
                json!({"duration_ms": duration_ms,
                    "error": {"kind": "tool-error", "message": "the tool reported an error"}})
            } else {
                json!({"duration_ms": duration_ms})
            };
            record_event(ctx, scope, "tool.called", event(!is_error, extra))?;
            Ok(ToolAnswer::Content(if is_error {
                json!({"error": text}).to_string()
            } else {
                text
            }))
        }
    }
}
