//! The Redis and cron triggers, as Spin and the spin-trigger-cron plugin run them: a fresh
//! instance per message or tick; Redis subscriptions per address, each message handled by
//! every component subscribed to its channel, one message at a time (the next waits until
//! the handlers return, as Spin's trigger awaits each handler); cron expressions with the
//! leading seconds field.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use wasmtime::component::{ComponentExportIndex, ComponentType, Lift, Lower};

/// `fermyon:spin/redis-types.error` (the unversioned package of `inbound-redis`).
#[derive(ComponentType, Lift, Lower, Debug, Clone, Copy, PartialEq)]
#[component(enum)]
#[repr(u8)]
pub enum RedisError {
    #[component(name = "success")]
    Success,
    #[component(name = "error")]
    Error,
}

/// `fermyon:spin-cron/cron-types@2.0.0.metadata`.
#[derive(ComponentType, Lift, Lower, Debug, Clone, Copy)]
#[component(record)]
pub struct CronMetadata {
    pub timestamp: u64,
}

/// `fermyon:spin-cron/cron-types@2.0.0.error`.
#[derive(ComponentType, Lift, Lower, Debug, Clone)]
#[component(variant)]
pub enum CronError {
    #[component(name = "other")]
    Other(String),
}

/// One `[[trigger.redis]]`, its templates rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSubscription {
    pub address: String,
    pub channel: String,
    pub component: String,
}

/// One `[[trigger.cron]]`.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    pub component: String,
    pub expression: String,
    pub schedule: sparkops_core::cron::Schedule,
}

impl CronSchedule {
    /// Parses `cron_expression` as the plugin does: six fields, seconds first.
    pub fn parse(component: &str, expression: &str) -> Result<Self> {
        let fields = expression.split_whitespace().count();
        if fields != 6 {
            bail!(
                "bad manifest: component `{component}`: cron_expression `{expression}` has {fields} fields; the cron trigger takes 6 (seconds first, e.g. \"0 * * * * *\")"
            );
        }
        let schedule = sparkops_core::cron::Schedule::parse(expression, "UTC").map_err(|e| {
            anyhow::anyhow!(
                "bad manifest: component `{component}`: cron_expression `{expression}`: {e}"
            )
        })?;
        Ok(Self {
            component: component.to_string(),
            expression: expression.to_string(),
            schedule,
        })
    }
}

/// The exports a trigger calls, found once when the component loads.
#[derive(Clone, Default)]
pub struct TriggerExports {
    pub redis: Option<ComponentExportIndex>,
    pub cron: Option<ComponentExportIndex>,
}

impl TriggerExports {
    pub fn find(component: &wasmtime::component::Component) -> Self {
        let redis = component
            .get_export_index(None, "fermyon:spin/inbound-redis")
            .and_then(|iface| component.get_export_index(Some(&iface), "handle-message"));
        let cron = component.get_export_index(None, "handle-cron-event");
        Self { redis, cron }
    }
}

/// Counts handlers in flight, so tests can wait until the triggers are idle.
#[derive(Default)]
pub struct Activity {
    busy: AtomicUsize,
    handled: AtomicUsize,
}

impl Activity {
    pub fn start(self: &Arc<Self>) -> ActivityGuard {
        self.busy.fetch_add(1, Ordering::SeqCst);
        ActivityGuard(self.clone())
    }

    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::SeqCst)
    }

    /// Messages and ticks handled so far.
    pub fn handled(&self) -> usize {
        self.handled.load(Ordering::SeqCst)
    }
}

pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.handled.fetch_add(1, Ordering::SeqCst);
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Subscribes to every channel of `subs` (all on one address) and hands each message to
/// its subscribers in turn, until the connection fails for good or `stop` fires.
pub async fn run_redis(
    app: Arc<crate::AppInner>,
    address: String,
    subs: Vec<RedisSubscription>,
    ready: tokio::sync::oneshot::Sender<Result<()>>,
) {
    let subscribed = async {
        let client = redis::Client::open(address.as_str())
            .with_context(|| format!("the Redis trigger address {address} is not valid"))?;
        let mut pubsub = client
            .get_async_pubsub()
            .await
            .with_context(|| format!("the Redis trigger cannot reach {address}"))?;
        let mut channels: Vec<&str> = subs.iter().map(|s| s.channel.as_str()).collect();
        channels.dedup();
        for channel in channels {
            pubsub.subscribe(channel).await?;
        }
        anyhow::Ok(pubsub)
    }
    .await;
    let pubsub = match subscribed {
        Ok(p) => {
            let _ = ready.send(Ok(()));
            p
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut messages = pubsub.into_on_message();
    // The stream ends when the connection is lost: like Spin, no reconnect; the app is told
    // and `sparkops up` ends with the error (the orchestrator in a cluster restarts it).
    while let Some(msg) = messages.next().await {
        let channel = msg.get_channel_name().to_string();
        let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
        for sub in subs.iter().filter(|s| s.channel == channel) {
            let _busy = app.activity.start();
            if let Err(e) = app.handle_redis(&sub.component, payload.clone()).await {
                eprintln!(
                    "component `{}` failed on a message on `{channel}`: {e:#}",
                    sub.component
                );
            }
        }
    }
    app.trigger_stopped(format!("disconnected from {}", redacted(&address)));
}

/// A Redis address without its password, for messages.
fn redacted(address: &str) -> String {
    match url::Url::parse(address) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => address.to_string(),
    }
}

/// Fires `schedule` at each of its times, each tick a fresh instance, until the app stops.
pub async fn run_cron(app: std::sync::Weak<crate::AppInner>, schedule: CronSchedule) {
    loop {
        let now = chrono::Utc::now();
        let Some(next) = schedule.schedule.next_after(now) else {
            return;
        };
        let wait = (next - now).to_std().unwrap_or_default();
        tokio::time::sleep(wait).await;
        let Some(app) = app.upgrade() else { return };
        if app
            .faults()
            .pause_cron
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            continue;
        }
        let _busy = app.activity.start();
        if let Err(e) = app
            .handle_cron(&schedule.component, next.timestamp() as u64)
            .await
        {
            eprintln!(
                "component `{}` failed on a cron tick: {e:#}",
                schedule.component
            );
        }
    }
}
