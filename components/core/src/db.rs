//! The database helper: plain value types, a [`Connection`] trait the Spin layer implements
//! over pg4, and [`transaction`], which always ends in `COMMIT` or `ROLLBACK`.
//!
//! Why the care: under Spin a pg4 connection holds one pooled client, and a client returned
//! inside an open transaction stays in it for the next request. So handlers never write
//! `BEGIN` themselves, and every path out of [`transaction`] that does not commit rolls back.
//!
//! Time values cross the SQL boundary as UTC `timestamp`s, because pg4 cannot read a
//! `timestamptz` nor bind one: columns stay `timestamptz`, reads select
//! [`utc`]`("created_at")` and writes bind [`Value::Timestamp`] into [`AS_TIMESTAMPTZ`].

use chrono::{DateTime, NaiveDateTime, Utc};

/// A parameter or a column value, in the types pg4 reads and binds faithfully.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int32(i32),
    Int64(i64),
    Float64(f64),
    Text(String),
    Bytes(Vec<u8>),
    /// A UUID in its canonical text form.
    Uuid(String),
    Json(serde_json::Value),
    /// A decimal in base-10 text, e.g. money (`"0.004210"`).
    Decimal(String),
    /// A UTC instant, bound as `timestamp` (see [`AS_TIMESTAMPTZ`]).
    Timestamp(DateTime<Utc>),
}

/// A database failure: the SQLSTATE `code` (empty when the failure was not the server's)
/// and a message for logs, never for response bodies.
#[derive(Debug, Clone, PartialEq)]
pub struct DbError {
    pub code: String,
    pub message: String,
    /// The constraint a violation names, when the server said.
    pub constraint: Option<String>,
}

impl DbError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            constraint: None,
        }
    }

    /// The database could not be reached, or went away: SQLSTATE class 08 (connection
    /// exception), the server shutting down or not accepting connections yet (57P01-57P03),
    /// or out of connections (53300). Worth trying again shortly; never the request's fault.
    pub fn is_unavailable(&self) -> bool {
        self.code.starts_with("08")
            || ["57P01", "57P02", "57P03", "53300"].contains(&self.code.as_str())
    }

    /// A server's error as Spin 3.x's pg4 host reports it: text only (`db error: ERROR:
    /// <message>`, its DETAIL and the error chain), without the SQLSTATE and fields that
    /// the WIT's structured `db-error` carries (and later hosts send). `None` when the text
    /// is not a server's error (a connection failure, say). The one condition callers
    /// branch on, a unique violation, is recognised from the server's message; a server
    /// that translates its messages (`lc_messages`) has it answered as a plain error.
    pub fn from_server_text(text: &str) -> Option<Self> {
        if !text.starts_with("db error") {
            return None;
        }
        // The server's own line: on the first line (`db error: ERROR: ...`) or, from a
        // client whose summary leaves it out, first among the causes.
        let line = text
            .lines()
            .map(|l| l.trim().trim_start_matches("db error: "))
            .find(|l| l.starts_with("ERROR: ") || l.starts_with("FATAL: "))
            .unwrap_or("db error");
        let message = line
            .trim_start_matches("ERROR: ")
            .trim_start_matches("FATAL: ");
        let unique = message
            .strip_prefix("duplicate key value violates unique constraint \"")
            .and_then(|rest| rest.split_once('"'))
            .map(|(name, _)| name.to_string());
        Some(Self {
            code: if unique.is_some() { "23505" } else { "" }.to_string(),
            message: message.to_string(),
            constraint: unique,
        })
    }

    /// True for a unique-constraint violation on `constraint`.
    pub fn is_unique_violation(&self, constraint: &str) -> bool {
        self.code == "23505" && self.constraint.as_deref() == Some(constraint)
    }
}

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.code.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{} (SQLSTATE {})", self.message, self.code)
        }
    }
}

impl std::error::Error for DbError {}

/// One result row, values in select-list order.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    fn at(&self, i: usize) -> Result<&Value, DbError> {
        self.0
            .get(i)
            .ok_or_else(|| DbError::new("", format!("column {i} is out of range")))
    }

    fn mismatch(&self, i: usize, want: &str) -> DbError {
        DbError::new(
            "",
            format!("column {i}: expected {want}, found {:?}", self.0.get(i)),
        )
    }

    pub fn text(&self, i: usize) -> Result<String, DbError> {
        match self.at(i)? {
            Value::Text(s) | Value::Uuid(s) | Value::Decimal(s) => Ok(s.clone()),
            _ => Err(self.mismatch(i, "text")),
        }
    }

    pub fn int(&self, i: usize) -> Result<i64, DbError> {
        match self.at(i)? {
            Value::Int32(v) => Ok((*v).into()),
            Value::Int64(v) => Ok(*v),
            _ => Err(self.mismatch(i, "an integer")),
        }
    }

    /// A nullable time column (selected with [`utc`]).
    pub fn opt_timestamp(&self, i: usize) -> Result<Option<DateTime<Utc>>, DbError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.timestamp(i).map(Some),
        }
    }

    /// A `numeric` money column (selected as text) in USD.
    pub fn usd(&self, i: usize) -> Result<crate::money::Usd, DbError> {
        crate::money::Usd::parse(&self.text(i)?)
            .map_err(|e| DbError::new("", format!("column {i}: {e}")))
    }

    /// A nullable money column.
    pub fn opt_usd(&self, i: usize) -> Result<Option<crate::money::Usd>, DbError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.usd(i).map(Some),
        }
    }

    /// A nullable time column (selected with [`utc`]) as RFC 3339 JSON, or `null`.
    pub fn time_json(&self, i: usize) -> Result<serde_json::Value, DbError> {
        Ok(self.opt_timestamp(i)?.map(crate::time::rfc3339).into())
    }

    /// A `jsonb` column; SQL `null` reads as JSON `null`.
    pub fn json(&self, i: usize) -> Result<serde_json::Value, DbError> {
        match self.at(i)? {
            Value::Json(v) => Ok(v.clone()),
            Value::Null => Ok(serde_json::Value::Null),
            _ => Err(self.mismatch(i, "jsonb")),
        }
    }

    pub fn bool(&self, i: usize) -> Result<bool, DbError> {
        match self.at(i)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.mismatch(i, "a boolean")),
        }
    }

    /// A nullable text-like column.
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, DbError> {
        match self.at(i)? {
            Value::Null => Ok(None),
            _ => self.text(i).map(Some),
        }
    }

    pub fn timestamp(&self, i: usize) -> Result<DateTime<Utc>, DbError> {
        match self.at(i)? {
            Value::Timestamp(t) => Ok(*t),
            _ => Err(self.mismatch(i, "a timestamp (select it with db::utc)")),
        }
    }
}

/// A connection to Postgres: the Spin layer implements it over pg4, tests over a fake.
pub trait Connection {
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError>;
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError>;
}

/// A connection inside [`transaction`]: the same calls, and no way to commit or roll back
/// by hand.
pub struct Tx<'c, C: Connection + ?Sized> {
    conn: &'c C,
}

impl<C: Connection + ?Sized> Tx<'_, C> {
    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        self.conn.execute(sql, params)
    }

    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        self.conn.query(sql, params)
    }
}

/// Reading, inside a transaction or not: for helpers that only read, so callers may pass a
/// connection or a [`Tx`] (a [`Tx`] is not a [`Connection`], which would let
/// [`transaction`] nest).
pub trait Read {
    fn read(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError>;
}

impl<C: Connection + ?Sized> Read for C {
    fn read(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        self.query(sql, params)
    }
}

impl<C: Connection + ?Sized> Read for Tx<'_, C> {
    fn read(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        self.query(sql, params)
    }
}

/// Runs `f` in a transaction: `COMMIT` when it returns `Ok`, `ROLLBACK` on any error
/// (including a failed `COMMIT`), so the connection never goes back to the pool mid-transaction.
pub fn transaction<C, T, E>(conn: &C, f: impl FnOnce(&Tx<'_, C>) -> Result<T, E>) -> Result<T, E>
where
    C: Connection + ?Sized,
    E: From<DbError>,
{
    conn.execute("begin", &[])?;
    let result = f(&Tx { conn });
    match result {
        Ok(value) => match conn.execute("commit", &[]) {
            Ok(_) => Ok(value),
            Err(e) => {
                // A failed COMMIT leaves the transaction aborted but open.
                let _ = conn.execute("rollback", &[]);
                Err(e.into())
            }
        },
        Err(e) => {
            let _ = conn.execute("rollback", &[]);
            Err(e)
        }
    }
}

/// A select-list expression reading a `timestamptz` column as a UTC `timestamp`.
pub fn utc(column: &str) -> String {
    format!("({column} at time zone 'UTC')")
}

/// `expr` (a `timestamptz`) as RFC 3339 text in UTC with microseconds, in SQL: for times
/// written into JSON by the database itself.
pub fn rfc3339_sql(expr: &str) -> String {
    format!("to_char({expr} at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
}

/// Cast to write after a [`Value::Timestamp`] placeholder: `$1::timestamp at time zone 'UTC'`.
pub const AS_TIMESTAMPTZ: &str = "::timestamp at time zone 'UTC'";

/// A UTC instant from a naive `timestamp` read at the boundary.
pub fn from_naive_utc(t: NaiveDateTime) -> DateTime<Utc> {
    t.and_utc()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// As Spin 3.6.3 reported a duplicate email (its anyhow chain, shortened).
    const SPIN3_DUPLICATE: &str = "db error: ERROR: duplicate key value violates unique constraint \"users_email_key\"\nDETAIL: Key (lower(email))=(connection@example.com) already exists.\n\nCaused by:\n    ERROR: duplicate key value violates unique constraint \"users_email_key\"\n\nStack backtrace:\n   0: <unknown>";

    #[test]
    fn a_unique_violation_reported_as_text_is_recognised_with_its_constraint() {
        let e = DbError::from_server_text(SPIN3_DUPLICATE).unwrap();
        assert!(e.is_unique_violation("users_email_key"));
        assert!(!e.is_unique_violation("projects_owner_slug_key"));
        assert!(
            !e.is_unavailable(),
            "the detail's words are not a lost connection"
        );
        assert_eq!(
            e.message,
            "duplicate key value violates unique constraint \"users_email_key\""
        );
        // A client whose summary is just "db error" names the server's line among causes.
        let bare = DbError::from_server_text(
            "db error\n\nCaused by:\n    ERROR: duplicate key value violates unique constraint \"uq_pkey\"\n    DETAIL: Key (x)=(1) already exists.",
        )
        .unwrap();
        assert!(bare.is_unique_violation("uq_pkey"));
        let other = DbError::from_server_text("db error: ERROR: division by zero").unwrap();
        assert_eq!((other.code.as_str(), other.constraint), ("", None));
        assert_eq!(DbError::from_server_text("connection closed"), None);
    }

    /// Records statements; fails any statement containing `fail_on`.
    #[derive(Default)]
    struct Fake {
        log: RefCell<Vec<String>>,
        fail_on: Option<&'static str>,
    }

    impl Connection for Fake {
        fn execute(&self, sql: &str, _: &[Value]) -> Result<u64, DbError> {
            self.log.borrow_mut().push(sql.to_string());
            match self.fail_on {
                Some(f) if sql.contains(f) => Err(DbError::new("40001", "could not serialize")),
                _ => Ok(1),
            }
        }
        fn query(&self, sql: &str, p: &[Value]) -> Result<Vec<Row>, DbError> {
            self.execute(sql, p).map(|_| vec![])
        }
    }

    #[test]
    fn a_successful_transaction_commits() {
        let db = Fake::default();
        let out: Result<u64, DbError> = transaction(&db, |tx| tx.execute("insert 1", &[]));
        assert_eq!(out, Ok(1));
        assert_eq!(*db.log.borrow(), ["begin", "insert 1", "commit"]);
    }

    #[test]
    fn an_error_inside_rolls_back_and_is_returned() {
        let db = Fake {
            fail_on: Some("insert 2"),
            ..Fake::default()
        };
        let out: Result<(), DbError> = transaction(&db, |tx| {
            tx.execute("insert 1", &[])?;
            tx.execute("insert 2", &[])?;
            tx.execute("insert 3", &[])?;
            Ok(())
        });
        assert_eq!(out.unwrap_err().code, "40001");
        assert_eq!(
            *db.log.borrow(),
            ["begin", "insert 1", "insert 2", "rollback"]
        );
    }

    #[test]
    fn an_early_return_of_the_callers_error_rolls_back() {
        #[derive(Debug, PartialEq)]
        enum E {
            Db,
            Invalid,
        }
        impl From<DbError> for E {
            fn from(_: DbError) -> Self {
                E::Db
            }
        }
        let db = Fake::default();
        let out: Result<(), E> = transaction(&db, |tx| {
            tx.execute("insert 1", &[])?;
            Err(E::Invalid)
        });
        assert_eq!(out, Err(E::Invalid));
        assert_eq!(db.log.borrow().last().unwrap(), "rollback");
    }

    #[test]
    fn a_failed_commit_is_rolled_back() {
        let db = Fake {
            fail_on: Some("commit"),
            ..Fake::default()
        };
        let out: Result<(), DbError> = transaction(&db, |_| Ok(()));
        assert!(out.is_err());
        assert_eq!(*db.log.borrow(), ["begin", "commit", "rollback"]);
    }

    #[test]
    fn time_columns_are_read_and_written_as_utc() {
        assert_eq!(utc("created_at"), "(created_at at time zone 'UTC')");
        let sql = format!("insert into t (at) values ($1{AS_TIMESTAMPTZ})");
        assert_eq!(
            sql,
            "insert into t (at) values ($1::timestamp at time zone 'UTC')"
        );
    }
}
