//! [`Db`]: a pg4 connection behind [`sparkops_core::db::Connection`].

use chrono::{Datelike, NaiveDate, NaiveTime, Timelike};
use sparkops_core::db::{Connection, DbError, Row, Value, from_naive_utc};
use spin_sdk::pg4::{self, DbValue, ParameterValue};

/// One pg4 connection (one pooled client under Spin) for the life of a request.
pub struct Db {
    conn: pg4::Connection,
}

impl Db {
    /// Opens a connection to `address` and resets it: a pooled client can come back from an
    /// instance that died mid-transaction still inside it, and `ROLLBACK` (a harmless
    /// warning outside a transaction) makes sure this request starts clean.
    pub fn open(address: &str) -> Result<Self, DbError> {
        let conn = pg4::Connection::open(address).map_err(pg_error)?;
        let db = Self { conn };
        db.execute("rollback", &[])?;
        Ok(db)
    }

    /// Opens the database named by the component variable `database_url`.
    pub fn open_default() -> Result<Self, DbError> {
        let url = crate::variable("database_url").map_err(|e| DbError::new("", e))?;
        Self::open(&url)
    }
}

impl Connection for Db {
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let params: Vec<ParameterValue> = params.iter().map(to_param).collect();
        self.conn.execute(sql, &params).map_err(pg_error)
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let params: Vec<ParameterValue> = params.iter().map(to_param).collect();
        let set = self.conn.query(sql, &params).map_err(pg_error)?;
        set.rows
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(from_db)
                    .collect::<Result<Vec<_>, _>>()
                    .map(Row)
            })
            .collect()
    }
}

fn to_param(v: &Value) -> ParameterValue {
    match v {
        Value::Null => ParameterValue::DbNull,
        Value::Bool(b) => ParameterValue::Boolean(*b),
        Value::Int32(i) => ParameterValue::Int32(*i),
        Value::Int64(i) => ParameterValue::Int64(*i),
        Value::Float64(f) => ParameterValue::Floating64(*f),
        Value::Text(s) => ParameterValue::Str(s.clone()),
        Value::Bytes(b) => ParameterValue::Binary(b.clone()),
        Value::Uuid(u) => ParameterValue::Uuid(u.clone()),
        Value::Json(j) => ParameterValue::Jsonb(serde_json::to_vec(j).unwrap_or_default()),
        Value::Decimal(d) => ParameterValue::Decimal(d.clone()),
        Value::Timestamp(t) => {
            let n = t.naive_utc();
            ParameterValue::Datetime((
                n.year(),
                n.month() as u8,
                n.day() as u8,
                n.hour() as u8,
                n.minute() as u8,
                n.second() as u8,
                n.nanosecond(),
            ))
        }
    }
}

fn from_db(v: DbValue) -> Result<Value, DbError> {
    Ok(match v {
        DbValue::DbNull => Value::Null,
        DbValue::Boolean(b) => Value::Bool(b),
        DbValue::Int16(i) => Value::Int32(i.into()),
        DbValue::Int32(i) => Value::Int32(i),
        DbValue::Int64(i) => Value::Int64(i),
        DbValue::Floating32(f) => Value::Float64(f.into()),
        DbValue::Floating64(f) => Value::Float64(f),
        DbValue::Str(s) => Value::Text(s),
        DbValue::Binary(b) => Value::Bytes(b),
        DbValue::Uuid(u) => Value::Uuid(u),
        DbValue::Jsonb(j) => Value::Json(
            serde_json::from_slice(&j).map_err(|e| DbError::new("", format!("bad jsonb: {e}")))?,
        ),
        DbValue::Decimal(d) => Value::Decimal(d),
        DbValue::Datetime((y, mo, d, h, mi, s, ns)) => {
            let date = NaiveDate::from_ymd_opt(y, mo.into(), d.into());
            let time = NaiveTime::from_hms_nano_opt(h.into(), mi.into(), s.into(), ns);
            match (date, time) {
                (Some(date), Some(time)) => Value::Timestamp(from_naive_utc(date.and_time(time))),
                _ => {
                    return Err(DbError::new(
                        "",
                        "the database returned an invalid date-time",
                    ));
                }
            }
        }
        other => {
            return Err(DbError::new(
                "",
                format!("unsupported column value {other:?}"),
            ));
        }
    })
}

fn pg_error(e: pg4::PgError) -> DbError {
    match e {
        pg4::PgError::QueryFailed(pg4::QueryError::DbError(db)) => DbError {
            code: db.code,
            message: db.message,
            constraint: db
                .extras
                .into_iter()
                .find(|(k, _)| k == "constraint")
                .map(|(_, v)| v),
        },
        // No connection (or it broke mid-query): SQLSTATE class 08, so callers answer 503.
        pg4::PgError::ConnectionFailed(m) => DbError::new("08001", m),
        // Spin 3.x reports a server's error met while a `query` runs as text
        // (`DbError::from_server_text`); other text is a lost connection or the host's own.
        pg4::PgError::QueryFailed(pg4::QueryError::Text(m)) => {
            match DbError::from_server_text(&m) {
                Some(e) => e,
                None if lost_connection(&m) => DbError::new("08006", m),
                None => DbError::new("", m),
            }
        }
        other => DbError::new("", other.to_string()),
    }
}

/// Whether an unstructured query failure says the connection went away (the server
/// restarted or the pooled client was closed).
fn lost_connection(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    [
        "closed",
        "connection",
        "broken pipe",
        "reset by peer",
        "timed out",
    ]
    .iter()
    .any(|w| m.contains(w))
}
