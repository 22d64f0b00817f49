//! `spin:postgres/postgres@4.0.0` over a pooled real Postgres, reproducing what Spin 3.6.3
//! does, failures included:
//! - a `connection` holds one pooled client for its life, so `BEGIN`/`COMMIT` through
//!   `execute` form a transaction, and a client dropped mid-transaction goes back to the pool
//!   still *idle in transaction* (recycling only checks the socket);
//! - values are bound with strict driver types (an `int64` into `int4`, a `str` into `uuid`
//!   or a `datetime` into `timestamptz` are wrong-type errors), so several statements in one
//!   `execute` fail in the extended protocol;
//! - `timestamp` and `timestamptz` columns are both read as a naive date-time, so any
//!   `timestamptz` value fails the whole query; `numeric` reads through `rust_decimal`; any
//!   type not in the WIT (`json` among them) reads as `unsupported`.
//!
//! Four things it does faster than Spin, invisibly to a guest: the pool hands out the client
//! returned last (Spin's hands out the one idle longest, so under load every client it has
//! opened, up to 64, each a server process with its own caches, takes its turn; here the few
//! the load needs stay warm and the rest stay idle); each pooled client keeps its
//! prepared statements (Spin prepares every statement again, a round trip and a parse and
//! plan on the server each time); a `ROLLBACK` sent to a client the host knows is outside
//! any transaction is answered here, as the server would answer it (no rows, a warning),
//! without the round trip; and a `BEGIN` on such a client is sent with the statement after
//! it, pipelined in one round trip (a `COMMIT` or `ROLLBACK` right after it ends the empty
//! transaction here; a client left with only its `BEGIN` goes back to the pool owing it, so
//! its next user is inside the transaction, as under Spin). Only the transaction's start
//! time (`now()`) moves, by the time between the two statements. The host knows because it
//! sees every statement a client runs: a client is *idle* when new, or after a
//! `COMMIT`/`ROLLBACK` that succeeded, and stays idle through statements run outside a
//! transaction; anything else (a `BEGIN` sent, a failed `COMMIT`, a lost connection) makes
//! it *maybe in a transaction* until a `ROLLBACK` reaches the server. A guest that resets its
//! client on open (as this app's does, for Spin) so pays that round trip only when a client
//! really may need it.

use std::collections::{HashMap, HashSet};
use std::error::Error as StdError;
use std::sync::Arc;

use bytes::BytesMut;
use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use postgres_range::{BoundType, Normalizable, Range, RangeBound};
use postgres_types::{FromSql, IsNull, ToSql, Type, accepts, to_sql_checked};
use rust_decimal::Decimal;
use tokio::sync::Mutex;
use tokio_postgres::Row;
use wasmtime::component::Resource;

use crate::bindings::spin::postgres4_0_0::postgres::{
    self as pg, Column, DbDataType, DbError, DbValue, Error, ParameterValue, QueryError,
    RangeBoundKind, RowSet,
};
use crate::state::InstanceState;

/// Max clients per address, as Spin.
const POOL_SIZE: usize = 64;

/// Prepared statements a pooled client keeps before it forgets them all (statements built
/// with literals in them would otherwise grow the cache, and the server's memory, forever).
const STATEMENT_CACHE_SIZE: usize = 512;

/// Pools keyed by connection string, shared by every instance of the app.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<String, deadpool_postgres::Pool>>,
    /// What is known of the pooled clients' transactions.
    clients: Arc<ClientStates>,
}

impl Pools {
    async fn client(&self, address: &str) -> Result<deadpool_postgres::Object, Error> {
        let pool = {
            let mut pools = self.pools.lock().await;
            match pools.get(address) {
                Some(p) => p.clone(),
                None => {
                    let p =
                        new_pool(address).map_err(|e| Error::ConnectionFailed(format!("{e:?}")))?;
                    pools.insert(address.to_string(), p.clone());
                    p
                }
            }
        };
        pool.get()
            .await
            .map_err(|e| Error::ConnectionFailed(format!("{e:?}")))
    }
}

fn new_pool(address: &str) -> anyhow::Result<deadpool_postgres::Pool> {
    let config: tokio_postgres::Config = address.parse()?;
    // `Fast` recycling checks only that the socket is alive: a client returned inside an
    // open transaction stays in it, which is the behaviour real Spin shows.
    let manager = deadpool_postgres::Manager::from_config(
        config,
        tokio_postgres::NoTls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Ok(deadpool_postgres::Pool::builder(manager)
        .max_size(POOL_SIZE)
        .queue_mode(deadpool_postgres::QueueMode::Lifo)
        .build()?)
}

/// The guest's open connection: one pooled client for the resource's life.
pub struct Connection {
    client: deadpool_postgres::Object,
    /// Whether the client is known to be outside any transaction.
    idle: bool,
    /// A `BEGIN` the guest ran on an idle client that the server has not seen yet: it is
    /// sent ahead of the next statement, pipelined with it (one round trip for both), and a
    /// `COMMIT` or `ROLLBACK` right after it ends the empty transaction here.
    begun: Option<String>,
    /// Where the client's state is remembered for its next user.
    clients: Arc<ClientStates>,
}

/// What the host remembers of pooled clients between their users, by pool object.
#[derive(Default)]
struct ClientStates {
    /// Known to be outside any transaction.
    idle: std::sync::Mutex<HashSet<deadpool_postgres::ObjectId>>,
    /// Left inside a transaction that only its `BEGIN` opened, not yet sent: the next user
    /// finds itself inside it, as it would have under Spin.
    begun: std::sync::Mutex<HashMap<deadpool_postgres::ObjectId, String>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let id = deadpool_postgres::Object::id(&self.client);
        let mut idle = self.clients.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut begun = self.clients.begun.lock().unwrap_or_else(|e| e.into_inner());
        // Ids of clients the pool has since discarded linger; forgetting every id now and
        // then only costs their next users a real `ROLLBACK`.
        if idle.len() + begun.len() >= 4 * POOL_SIZE {
            idle.clear();
            begun.clear();
        }
        idle.remove(&id);
        begun.remove(&id);
        match self.begun.take() {
            Some(statement) => {
                begun.insert(id, statement);
            }
            None if self.idle => {
                idle.insert(id);
            }
            None => {}
        }
    }
}

/// What a statement does to its client's transaction, by its text (the extended protocol
/// runs one statement at a time, so the text is the whole statement).
#[derive(Debug, PartialEq, Clone, Copy)]
enum TxControl {
    /// `BEGIN`, `START TRANSACTION`: in a transaction after it.
    Begins,
    /// `COMMIT`, `END`, `ROLLBACK`, `ABORT` (not `... AND CHAIN`, not `ROLLBACK TO`):
    /// outside any transaction after it succeeds.
    Ends,
    /// `ROLLBACK` alone: ends, and may be answered here on an idle client.
    RollsBack,
    Other,
}

fn tx_control(statement: &str) -> TxControl {
    // Three words decide it: the longest form with an end is two words.
    let words: Vec<String> = statement
        .trim()
        .trim_end_matches(';')
        .split_whitespace()
        .take(3)
        .map(str::to_ascii_lowercase)
        .collect();
    let words: Vec<&str> = words.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["begin", ..] | ["start", "transaction", ..] => TxControl::Begins,
        ["rollback" | "abort"] | ["rollback" | "abort", "work" | "transaction"] => {
            TxControl::RollsBack
        }
        ["commit" | "end"] | ["commit" | "end", "work" | "transaction"] => TxControl::Ends,
        _ => TxControl::Other,
    }
}

impl Connection {
    /// The client's statement for `sql`, prepared once per client.
    async fn prepare(&self, sql: &str) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        if self.client.statement_cache.size() >= STATEMENT_CACHE_SIZE {
            self.client.statement_cache.clear();
        }
        self.client.prepare_cached(sql).await
    }

    /// The deferred `BEGIN`, to be sent now: from here the client may be in a transaction.
    fn take_begin(&mut self) -> Option<String> {
        let begin = self.begun.take();
        self.idle &= begin.is_none();
        begin
    }

    /// Notes what running a statement whose transaction control is `control`, with
    /// `outcome`, did to the client's transaction.
    fn ran<T, E>(&mut self, control: TxControl, outcome: &Result<T, E>) {
        self.idle = match control {
            TxControl::Begins => false,
            TxControl::Ends | TxControl::RollsBack => outcome.is_ok(),
            // A statement outside a transaction commits or rolls back on its own; one inside
            // leaves the transaction open (aborted when it failed).
            TxControl::Other => self.idle,
        };
    }
}

/// Runs `op` on `client`, after the guest's deferred `begin` (when there is one), sent ahead
/// of it in the same round trip: `Err` when the `BEGIN` failed.
async fn after_begin<T>(
    client: &tokio_postgres::Client,
    begin: Option<&str>,
    op: impl std::future::Future<Output = T>,
) -> Result<T, tokio_postgres::Error> {
    match begin {
        None => Ok(op.await),
        // Joined futures are first polled in order, and each sends its messages on its first
        // poll: the `BEGIN` reaches the server first.
        Some(begin) => {
            let (began, outcome) = tokio::join!(client.batch_execute(begin), op);
            began.map(|()| outcome)
        }
    }
}

/// Whether `e` says a cached statement went stale (a table it reads changed shape): it is
/// prepared again and run once more.
fn stale_statement(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::FEATURE_NOT_SUPPORTED)
        && e.as_db_error().is_some_and(|db| {
            db.message()
                .contains("cached plan must not change result type")
        })
}

impl pg::Host for InstanceState {}

impl pg::HostConnection for InstanceState {
    async fn open(&mut self, address: String) -> Result<Resource<Connection>, Error> {
        if !self.component.allowed_hosts.allows_url(&address) {
            eprintln!(
                "component `{}` tried to connect to Postgres at a host not in allowed_outbound_hosts",
                self.component.id
            );
            return Err(Error::ConnectionFailed(
                "address is not permitted by the component's allowed_outbound_hosts".into(),
            ));
        }
        let postgres = &self.app.postgres;
        let client = postgres.client(&address).await?;
        let id = deadpool_postgres::Object::id(&client);
        let fresh = deadpool_postgres::Object::metrics(&client).recycle_count == 0;
        let clients = &postgres.clients;
        let begun = match fresh {
            true => None,
            false => clients
                .begun
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id),
        };
        let idle = fresh
            || begun.is_some()
            || clients
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
        self.table
            .push(Connection {
                client,
                idle,
                begun,
                clients: clients.clone(),
            })
            .map_err(|e| Error::Other(e.to_string()))
    }

    async fn query(
        &mut self,
        c: Resource<Connection>,
        statement: String,
        params: Vec<ParameterValue>,
    ) -> Result<RowSet, Error> {
        let conn = self
            .table
            .get_mut(&c)
            .map_err(|e| Error::Other(e.to_string()))?;
        let params = to_sql_all(&params).map_err(Error::BadParameter)?;
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        // Prepared, then run: Spin reports a failure of each differently (`run_failed`).
        let begin = conn.take_begin();
        let first = after_begin(&conn.client, begin.as_deref(), async {
            match conn.prepare(&statement).await {
                Ok(prepared) => conn.client.query(&prepared, &refs).await.map_err(Ok),
                Err(e) => Err(Err(e)),
            }
        })
        .await;
        let mut outcome = first.map_err(query_failed)?;
        if matches!(&outcome, Err(Ok(e)) if stale_statement(e)) {
            conn.client.statement_cache.clear();
            outcome = match conn.prepare(&statement).await {
                Ok(prepared) => conn.client.query(&prepared, &refs).await.map_err(Ok),
                Err(e) => Err(Err(e)),
            };
        }
        conn.ran(tx_control(&statement), &outcome);
        let rows = outcome.map_err(|e| match e {
            Ok(ran) => run_failed(ran),
            Err(prepared) => query_failed(prepared),
        })?;
        let Some(first) = rows.first() else {
            return Ok(RowSet {
                columns: vec![],
                rows: vec![],
            });
        };
        let columns = first
            .columns()
            .iter()
            .map(|c| Column {
                name: c.name().to_string(),
                data_type: data_type(c.type_()),
            })
            .collect();
        let rows = rows
            .iter()
            .map(convert_row)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::QueryFailed(QueryError::Text(e)))?;
        Ok(RowSet { columns, rows })
    }

    async fn execute(
        &mut self,
        c: Resource<Connection>,
        statement: String,
        params: Vec<ParameterValue>,
    ) -> Result<u64, Error> {
        let conn = self
            .table
            .get_mut(&c)
            .map_err(|e| Error::Other(e.to_string()))?;
        let params = to_sql_all(&params).map_err(Error::ValueConversionFailed)?;
        let control = tx_control(&statement);
        if conn.idle && params.is_empty() {
            match control {
                // Sent with the statement after it; the server would answer a second
                // `BEGIN` with a warning and no rows.
                TxControl::Begins => {
                    conn.begun.get_or_insert(statement);
                    return Ok(0);
                }
                // The server would warn "no transaction in progress" (or end an empty one)
                // and report no rows.
                TxControl::RollsBack => {
                    conn.begun = None;
                    return Ok(0);
                }
                TxControl::Ends if conn.begun.is_some() => {
                    conn.begun = None;
                    return Ok(0);
                }
                TxControl::Ends | TxControl::Other => {}
            }
        }
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref() as _).collect();
        let begin = conn.take_begin();
        let first = after_begin(&conn.client, begin.as_deref(), async {
            match conn.prepare(&statement).await {
                Ok(prepared) => conn.client.execute(&prepared, &refs).await,
                Err(e) => Err(e),
            }
        })
        .await;
        let mut outcome = first.map_err(query_failed)?;
        if matches!(&outcome, Err(e) if stale_statement(e)) {
            conn.client.statement_cache.clear();
            outcome = match conn.prepare(&statement).await {
                Ok(prepared) => conn.client.execute(&prepared, &refs).await,
                Err(e) => Err(e),
            };
        }
        conn.ran(control, &outcome);
        outcome.map_err(query_failed)
    }

    async fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        Ok(())
    }
}

/// A `query` whose statement prepared but failed as it ran (a unique violation of an
/// `insert ... returning`, say): Spin 3.6.3 reports the server's error as text, the `Debug`
/// form of its error chain (`db error: ERROR: ...`), not as the structured `db-error` it
/// sends for a statement that does not prepare and for every `execute` (checked under
/// `spin up` with the conformance fixture). Guests read both (`DbError::from_server_text`).
fn run_failed(e: tokio_postgres::Error) -> Error {
    let Some(db) = e.as_db_error() else {
        return query_failed(e);
    };
    // Spin's text: its client's summary with the server's error, then the chain.
    let server = db.to_string();
    Error::QueryFailed(QueryError::Text(format!(
        "db error: {server}\n\nCaused by:\n    {}",
        server.replace('\n', "\n    ")
    )))
}

fn query_failed(e: tokio_postgres::Error) -> Error {
    let as_text = format!("{e:?}");
    Error::QueryFailed(match e.as_db_error() {
        None => QueryError::Text(as_text),
        Some(db) => {
            let mut extras = Vec::new();
            let mut extra = |name: &str, v: Option<String>| {
                if let Some(v) = v {
                    extras.push((name.to_string(), v));
                }
            };
            extra("column", db.column().map(str::to_string));
            extra("constraint", db.constraint().map(str::to_string));
            extra("routine", db.routine().map(str::to_string));
            extra("hint", db.hint().map(str::to_string));
            extra("table", db.table().map(str::to_string));
            extra("datatype", db.datatype().map(str::to_string));
            extra("schema", db.schema().map(str::to_string));
            extra("file", db.file().map(str::to_string));
            extra("line", db.line().map(|l| l.to_string()));
            extra("where_", db.where_().map(str::to_string));
            QueryError::DbError(DbError {
                as_text,
                severity: db.severity().to_string(),
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                extras,
            })
        }
    })
}

fn data_type(t: &Type) -> DbDataType {
    match *t {
        Type::BOOL => DbDataType::Boolean,
        Type::BYTEA => DbDataType::Binary,
        Type::FLOAT4 => DbDataType::Floating32,
        Type::FLOAT8 => DbDataType::Floating64,
        Type::INT2 => DbDataType::Int16,
        Type::INT4 => DbDataType::Int32,
        Type::INT8 => DbDataType::Int64,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR => DbDataType::Str,
        Type::TIMESTAMP | Type::TIMESTAMPTZ => DbDataType::Datetime,
        Type::DATE => DbDataType::Date,
        Type::TIME => DbDataType::Time,
        Type::UUID => DbDataType::Uuid,
        Type::JSONB => DbDataType::Jsonb,
        Type::NUMERIC => DbDataType::Decimal,
        Type::INT4_RANGE => DbDataType::RangeInt32,
        Type::INT8_RANGE => DbDataType::RangeInt64,
        Type::NUM_RANGE => DbDataType::RangeDecimal,
        Type::INT4_ARRAY => DbDataType::ArrayInt32,
        Type::INT8_ARRAY => DbDataType::ArrayInt64,
        Type::NUMERIC_ARRAY => DbDataType::ArrayDecimal,
        Type::TEXT_ARRAY | Type::VARCHAR_ARRAY | Type::BPCHAR_ARRAY => DbDataType::ArrayStr,
        Type::INTERVAL => DbDataType::Interval,
        _ => DbDataType::Other(t.name().to_string()),
    }
}

fn convert_row(row: &Row) -> Result<Vec<DbValue>, String> {
    (0..row.len())
        .map(|i| convert_value(row, i).map_err(|e| format!("{e:?}")))
        .collect()
}

/// Reads column `i` as `T`, mapping SQL `NULL` to `db-null`.
fn get<'a, T: FromSql<'a>>(
    row: &'a Row,
    i: usize,
    f: impl FnOnce(T) -> DbValue,
) -> Result<DbValue, tokio_postgres::Error> {
    Ok(row.try_get::<_, Option<T>>(i)?.map_or(DbValue::DbNull, f))
}

fn convert_value(row: &Row, i: usize) -> Result<DbValue, tokio_postgres::Error> {
    let t = row.columns()[i].type_().clone();
    match t {
        Type::BOOL => get(row, i, DbValue::Boolean),
        Type::BYTEA => get(row, i, DbValue::Binary),
        Type::FLOAT4 => get(row, i, DbValue::Floating32),
        Type::FLOAT8 => get(row, i, DbValue::Floating64),
        Type::INT2 => get(row, i, DbValue::Int16),
        Type::INT4 => get(row, i, DbValue::Int32),
        Type::INT8 => get(row, i, DbValue::Int64),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR => get(row, i, DbValue::Str),
        // Both read as a naive date-time: for `timestamptz` the driver refuses, failing the
        // whole query, exactly as Spin does.
        Type::TIMESTAMP | Type::TIMESTAMPTZ => get(row, i, |v: NaiveDateTime| {
            DbValue::Datetime((
                v.year(),
                v.month() as u8,
                v.day() as u8,
                v.hour() as u8,
                v.minute() as u8,
                v.second() as u8,
                v.nanosecond(),
            ))
        }),
        Type::DATE => get(row, i, |v: NaiveDate| {
            DbValue::Date((v.year(), v.month() as u8, v.day() as u8))
        }),
        Type::TIME => get(row, i, |v: NaiveTime| {
            DbValue::Time((
                v.hour() as u8,
                v.minute() as u8,
                v.second() as u8,
                v.nanosecond(),
            ))
        }),
        Type::UUID => get(row, i, |v: uuid::Uuid| DbValue::Uuid(v.to_string())),
        Type::JSONB => get(row, i, |v: serde_json::Value| {
            DbValue::Jsonb(serde_json::to_vec(&v).unwrap_or_default())
        }),
        Type::NUMERIC => get(row, i, |v: Decimal| DbValue::Decimal(v.to_string())),
        Type::INT4_RANGE => get(row, i, |v: Range<i32>| {
            DbValue::RangeInt32(range_to_wit(&v, |x| *x))
        }),
        Type::INT8_RANGE => get(row, i, |v: Range<i64>| {
            DbValue::RangeInt64(range_to_wit(&v, |x| *x))
        }),
        Type::NUM_RANGE => get(row, i, |v: Range<RangeDecimal>| {
            DbValue::RangeDecimal(range_to_wit(&v, |x| x.0.to_string()))
        }),
        Type::INT4_ARRAY => get(row, i, DbValue::ArrayInt32),
        Type::INT8_ARRAY => get(row, i, DbValue::ArrayInt64),
        Type::NUMERIC_ARRAY => get(row, i, |v: Vec<Option<Decimal>>| {
            DbValue::ArrayDecimal(v.into_iter().map(|d| d.map(|d| d.to_string())).collect())
        }),
        Type::TEXT_ARRAY | Type::VARCHAR_ARRAY | Type::BPCHAR_ARRAY => {
            get(row, i, DbValue::ArrayStr)
        }
        Type::INTERVAL => get(row, i, |v: Interval| DbValue::Interval(v.0)),
        _ => get(row, i, |v: Raw| DbValue::Unsupported(v.0)),
    }
}

type WitBound<T> = Option<(T, RangeBoundKind)>;

fn range_to_wit<T: PartialOrd + Normalizable, W>(
    r: &Range<T>,
    f: impl Fn(&T) -> W,
) -> (WitBound<W>, WitBound<W>) {
    fn kind(b: BoundType) -> RangeBoundKind {
        match b {
            BoundType::Inclusive => RangeBoundKind::Inclusive,
            BoundType::Exclusive => RangeBoundKind::Exclusive,
        }
    }
    (
        r.lower().map(|b| (f(&b.value), kind(b.type_))),
        r.upper().map(|b| (f(&b.value), kind(b.type_))),
    )
}

fn range_from_wit<T: PartialOrd + Normalizable, W>(
    (lo, hi): &(WitBound<W>, WitBound<W>),
    f: impl Fn(&W) -> Result<T, String>,
) -> Result<Range<T>, String> {
    fn kind(k: RangeBoundKind) -> BoundType {
        match k {
            RangeBoundKind::Inclusive => BoundType::Inclusive,
            RangeBoundKind::Exclusive => BoundType::Exclusive,
        }
    }
    let lo = match lo {
        Some((v, k)) => Some(RangeBound::new(f(v)?, kind(*k))),
        None => None,
    };
    let hi = match hi {
        Some((v, k)) => Some(RangeBound::new(f(v)?, kind(*k))),
        None => None,
    };
    Ok(Range::new(lo, hi))
}

type Param = Box<dyn ToSql + Send + Sync>;

fn to_sql_all(params: &[ParameterValue]) -> Result<Vec<Param>, String> {
    params.iter().map(to_sql).collect()
}

fn decimal(s: &str) -> Result<Decimal, String> {
    Decimal::from_str_exact(s).map_err(|e| format!("invalid decimal {s}: {e}"))
}

fn to_sql(p: &ParameterValue) -> Result<Param, String> {
    use ParameterValue as P;
    Ok(match p {
        P::Boolean(v) => Box::new(*v),
        P::Int8(v) => Box::new(*v),
        P::Int16(v) => Box::new(*v),
        P::Int32(v) => Box::new(*v),
        P::Int64(v) => Box::new(*v),
        P::Floating32(v) => Box::new(*v),
        P::Floating64(v) => Box::new(*v),
        P::Str(v) => Box::new(v.clone()),
        P::Binary(v) => Box::new(v.clone()),
        P::Date((y, m, d)) => Box::new(
            NaiveDate::from_ymd_opt(*y, (*m).into(), (*d).into())
                .ok_or_else(|| format!("invalid date y={y}, m={m}, d={d}"))?,
        ),
        P::Time((h, m, s, ns)) => Box::new(
            NaiveTime::from_hms_nano_opt((*h).into(), (*m).into(), (*s).into(), *ns)
                .ok_or_else(|| format!("invalid time {h}:{m}:{s}.{ns}"))?,
        ),
        P::Datetime((y, mo, d, h, mi, s, ns)) => {
            let date = NaiveDate::from_ymd_opt(*y, (*mo).into(), (*d).into())
                .ok_or_else(|| format!("invalid date y={y}, m={mo}, d={d}"))?;
            let time = NaiveTime::from_hms_nano_opt((*h).into(), (*mi).into(), (*s).into(), *ns)
                .ok_or_else(|| format!("invalid time {h}:{mi}:{s}.{ns}"))?;
            // A naive date-time binds only to `timestamp`: into `timestamptz` it is WrongType.
            Box::new(NaiveDateTime::new(date, time))
        }
        P::Timestamp(secs) => Box::new(
            chrono::DateTime::<chrono::Utc>::from_timestamp(*secs, 0)
                .ok_or_else(|| format!("invalid epoch timestamp {secs}"))?,
        ),
        P::Uuid(v) => Box::new(uuid::Uuid::parse_str(v).map_err(|_| format!("invalid UUID {v}"))?),
        P::Jsonb(v) => Box::new(
            serde_json::from_slice::<serde_json::Value>(v)
                .map_err(|_| format!("invalid JSON {}", String::from_utf8_lossy(v)))?,
        ),
        P::Decimal(v) => Box::new(decimal(v)?),
        P::RangeInt32(r) => Box::new(range_from_wit(r, |v| Ok(*v))?),
        P::RangeInt64(r) => Box::new(range_from_wit(r, |v| Ok(*v))?),
        P::RangeDecimal(r) => Box::new(range_from_wit(r, |v| decimal(v).map(RangeDecimal))?),
        P::ArrayInt32(v) => Box::new(v.clone()),
        P::ArrayInt64(v) => Box::new(v.clone()),
        P::ArrayDecimal(v) => Box::new(
            v.iter()
                .map(|d| d.as_deref().map(decimal).transpose())
                .collect::<Result<Vec<_>, _>>()?,
        ),
        P::ArrayStr(v) => Box::new(v.clone()),
        P::Interval(v) => Box::new(Interval(*v)),
        P::DbNull => Box::new(Null),
    })
}

type BoxError = Box<dyn StdError + Sync + Send>;

/// A decimal that ranges can hold (`numrange`), with no normalisation (Postgres does none).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
struct RangeDecimal(Decimal);

impl Normalizable for RangeDecimal {
    fn normalize<S: postgres_range::BoundSided>(bound: RangeBound<S, Self>) -> RangeBound<S, Self> {
        bound
    }
}

impl ToSql for RangeDecimal {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        self.0.to_sql(ty, out)
    }
    accepts!(NUMERIC);
    to_sql_checked!();
}

impl<'a> FromSql<'a> for RangeDecimal {
    fn from_sql(ty: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Decimal::from_sql(ty, raw).map(RangeDecimal)
    }
    accepts!(NUMERIC);
}

/// `interval` in Postgres' binary form: microseconds, days, months.
#[derive(Debug)]
struct Interval(pg::Interval);

impl ToSql for Interval {
    fn to_sql(&self, _: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        use bytes::BufMut;
        out.put_i64(self.0.micros);
        out.put_i32(self.0.days);
        out.put_i32(self.0.months);
        Ok(IsNull::No)
    }
    accepts!(INTERVAL);
    to_sql_checked!();
}

impl<'a> FromSql<'a> for Interval {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        let raw: [u8; 16] = raw.try_into().map_err(|_| "interval must be 16 bytes")?;
        Ok(Interval(pg::Interval {
            micros: i64::from_be_bytes(raw[0..8].try_into()?),
            days: i32::from_be_bytes(raw[8..12].try_into()?),
            months: i32::from_be_bytes(raw[12..16].try_into()?),
        }))
    }
    accepts!(INTERVAL);
}

/// SQL `NULL` for a parameter of any type.
#[derive(Debug)]
struct Null;

impl ToSql for Null {
    fn to_sql(&self, _: &Type, _: &mut BytesMut) -> Result<IsNull, BoxError> {
        Ok(IsNull::Yes)
    }
    fn accepts(_: &Type) -> bool {
        true
    }
    to_sql_checked!();
}

/// The raw bytes of a value whose type the WIT has no case for.
struct Raw(Vec<u8>);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(_: &Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        Ok(Raw(raw.to_vec()))
    }
    fn accepts(_: &Type) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{TxControl, tx_control};

    #[test]
    fn transaction_control_is_read_from_the_whole_statement() {
        for begins in [
            "begin",
            "BEGIN;",
            "begin isolation level serializable",
            "start transaction",
        ] {
            assert_eq!(tx_control(begins), TxControl::Begins, "{begins}");
        }
        for resets in [
            "rollback",
            " ROLLBACK ; ",
            "abort",
            "rollback work",
            "rollback transaction",
        ] {
            assert_eq!(tx_control(resets), TxControl::RollsBack, "{resets}");
        }
        for ends in ["commit", "END", "commit work;"] {
            assert_eq!(tx_control(ends), TxControl::Ends, "{ends}");
        }
        // These leave a transaction open, or are not about one.
        for other in [
            "rollback to savepoint s",
            "rollback to s",
            "commit and chain",
            "rollback and chain",
            "select 'rollback'",
            "rollbacks",
        ] {
            assert_eq!(tx_control(other), TxControl::Other, "{other}");
        }
    }
}
