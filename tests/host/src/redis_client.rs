//! `fermyon:spin/redis@2.0.0`: outbound Redis, only to `redis://` hosts the component's
//! `allowed_outbound_hosts` allows. Connections are shared per address, as in Spin.

use ::redis::{RedisError, ToRedisArgs, Value, aio::ConnectionManager};
use wasmtime::component::Resource;

use crate::bindings::fermyon::spin2_0_0::redis::{self, Error, RedisParameter, RedisResult};
use crate::state::InstanceState;

/// The guest's open connection handle.
pub struct Connection {
    conn: ConnectionManager,
}

fn other(e: impl std::fmt::Display) -> Error {
    Error::Other(e.to_string())
}

fn type_error(e: RedisError) -> Error {
    if e.kind() == ::redis::ErrorKind::TypeError {
        Error::TypeError
    } else {
        other(e)
    }
}

impl InstanceState {
    fn redis(&self, c: &Resource<Connection>) -> Result<ConnectionManager, Error> {
        Ok(self.table.get(c).map_err(other)?.conn.clone())
    }
}

struct Arg(RedisParameter);

impl ToRedisArgs for Arg {
    fn write_redis_args<W: ?Sized + ::redis::RedisWrite>(&self, out: &mut W) {
        match &self.0 {
            RedisParameter::Int64(i) => i.write_redis_args(out),
            RedisParameter::Binary(b) => b.write_redis_args(out),
        }
    }
}

fn to_results(value: Value) -> Vec<RedisResult> {
    match value {
        Value::Nil => vec![RedisResult::Nil],
        Value::Int(i) => vec![RedisResult::Int64(i)],
        Value::BulkString(b) => vec![RedisResult::Binary(b)],
        Value::SimpleString(s) => vec![RedisResult::Status(s)],
        Value::Okay => vec![RedisResult::Status("OK".into())],
        Value::Array(items) | Value::Set(items) => items.into_iter().flat_map(to_results).collect(),
        Value::Double(d) => vec![RedisResult::Binary(d.to_string().into_bytes())],
        Value::Boolean(b) => vec![RedisResult::Int64(b.into())],
        other => vec![RedisResult::Binary(format!("{other:?}").into_bytes())],
    }
}

impl redis::Host for InstanceState {}

impl redis::HostConnection for InstanceState {
    async fn open(
        &mut self,
        address: String,
    ) -> wasmtime::Result<Result<Resource<Connection>, Error>> {
        if !self.component.allowed_hosts.allows_url(&address) {
            eprintln!(
                "component `{}` tried to connect to Redis at a host not in allowed_outbound_hosts",
                self.component.id
            );
            return Ok(Err(Error::InvalidAddress));
        }
        // Spin checks `block_networks` for outbound Redis as for HTTP (not for Postgres):
        // when every address is blocked, the invocation ends rather than getting an error.
        // (A name that does not resolve fails below, when the connection is made.)
        let host_port = url::Url::parse(&address)
            .ok()
            .and_then(|u| Some((u.host_str()?.to_string(), u.port().unwrap_or(6379))));
        if let Some((host, port)) = host_port
            && let Ok((blocked, total)) =
                self.blocked_networks().blocked_addresses(&host, port).await
            && total > 0
            && blocked.len() == total
        {
            wasmtime::bail!(
                "destination IP prohibited by runtime config: Redis at {blocked:?} (component `{}`)",
                self.component.id
            );
        }
        Ok(match self.app.redis_connection(&address).await {
            Ok(conn) => self.table.push(Connection { conn }).map_err(other),
            Err(e) => Err(e),
        })
    }

    async fn publish(
        &mut self,
        c: Resource<Connection>,
        channel: String,
        payload: Vec<u8>,
    ) -> Result<(), Error> {
        let mut conn = self.redis(&c)?;
        if self
            .app
            .faults
            .drop_redis_publishes
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        ::redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await
            .map(drop)
            .map_err(other)
    }

    async fn get(
        &mut self,
        c: Resource<Connection>,
        key: String,
    ) -> Result<Option<Vec<u8>>, Error> {
        let mut conn = self.redis(&c)?;
        ::redis::cmd("GET")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(type_error)
    }

    async fn set(
        &mut self,
        c: Resource<Connection>,
        key: String,
        value: Vec<u8>,
    ) -> Result<(), Error> {
        let mut conn = self.redis(&c)?;
        ::redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async::<()>(&mut conn)
            .await
            .map_err(other)
    }

    async fn incr(&mut self, c: Resource<Connection>, key: String) -> Result<i64, Error> {
        let mut conn = self.redis(&c)?;
        ::redis::cmd("INCR")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(type_error)
    }

    async fn del(&mut self, c: Resource<Connection>, keys: Vec<String>) -> Result<u32, Error> {
        let mut conn = self.redis(&c)?;
        ::redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .map_err(type_error)
    }

    async fn sadd(
        &mut self,
        c: Resource<Connection>,
        key: String,
        values: Vec<String>,
    ) -> Result<u32, Error> {
        let mut conn = self.redis(&c)?;
        ::redis::cmd("SADD")
            .arg(key)
            .arg(values)
            .query_async(&mut conn)
            .await
            .map_err(type_error)
    }

    async fn smembers(
        &mut self,
        c: Resource<Connection>,
        key: String,
    ) -> Result<Vec<String>, Error> {
        let mut conn = self.redis(&c)?;
        ::redis::cmd("SMEMBERS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .map_err(type_error)
    }

    async fn srem(
        &mut self,
        c: Resource<Connection>,
        key: String,
        values: Vec<String>,
    ) -> Result<u32, Error> {
        let mut conn = self.redis(&c)?;
        ::redis::cmd("SREM")
            .arg(key)
            .arg(values)
            .query_async(&mut conn)
            .await
            .map_err(type_error)
    }

    async fn execute(
        &mut self,
        c: Resource<Connection>,
        command: String,
        arguments: Vec<RedisParameter>,
    ) -> Result<Vec<RedisResult>, Error> {
        let mut conn = self.redis(&c)?;
        let mut cmd = ::redis::cmd(&command);
        for a in arguments {
            cmd.arg(Arg(a));
        }
        let value: Value = cmd.query_async(&mut conn).await.map_err(other)?;
        Ok(to_results(value))
    }

    async fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        Ok(())
    }
}
