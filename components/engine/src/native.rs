//! A blocking native connection behind [`Connection`], binding and reading values as the
//! Spin layer's pg4 does (a timestamp as a naive UTC `timestamp`; a UUID, a decimal and JSON
//! in their binary forms; `null` into any type), and keeping each statement prepared, as
//! the project's host does. For the engine's native suite and the benchmark's Postgres
//! ceiling (the engine's own statements with no wasm in between); not for components.

use std::cell::RefCell;
use std::collections::HashMap;

use chrono::{DateTime, NaiveDateTime, Utc};
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, NoTls, Statement};
use rust_decimal::Decimal;
use serde_json::Value;
use sparkops_core::db::{Connection, DbError, Row, Value as V};

/// One blocking connection, as the engine sees a pg4 one.
pub struct Pg {
    client: RefCell<Client>,
    /// Statements prepared on this connection, by their SQL.
    prepared: RefCell<HashMap<String, Statement>>,
    pub url: String,
}

impl Pg {
    pub fn connect(url: &str) -> Result<Pg, DbError> {
        Ok(Pg {
            client: RefCell::new(Client::connect(url, NoTls).map_err(db_error)?),
            prepared: RefCell::default(),
            url: url.to_string(),
        })
    }

    /// `sql` prepared on this connection, once.
    fn statement(&self, sql: &str) -> Result<Statement, DbError> {
        if let Some(statement) = self.prepared.borrow().get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.borrow_mut().prepare(sql).map_err(db_error)?;
        self.prepared
            .borrow_mut()
            .insert(sql.to_string(), statement.clone());
        Ok(statement)
    }
}

impl Connection for Pg {
    fn execute(&self, sql: &str, params: &[V]) -> Result<u64, DbError> {
        let statement = self.statement(sql)?;
        let params: Vec<Param> = params.iter().map(Param).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        self.client
            .borrow_mut()
            .execute(&statement, &refs)
            .map_err(db_error)
    }

    fn query(&self, sql: &str, params: &[V]) -> Result<Vec<Row>, DbError> {
        let statement = self.statement(sql)?;
        let params: Vec<Param> = params.iter().map(Param).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let rows = self
            .client
            .borrow_mut()
            .query(&statement, &refs)
            .map_err(db_error)?;
        rows.iter().map(row).collect()
    }
}

fn db_error(e: postgres::Error) -> DbError {
    match e.as_db_error() {
        Some(d) => DbError {
            code: d.code().code().to_string(),
            message: d.message().to_string(),
            constraint: d.constraint().map(str::to_string),
        },
        None => DbError::new("", e.to_string()),
    }
}

#[derive(Debug)]
struct Param<'a>(&'a V);

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            V::Null => Ok(IsNull::Yes),
            V::Bool(v) => v.to_sql(ty, out),
            V::Int32(v) => v.to_sql(ty, out),
            V::Int64(v) => v.to_sql(ty, out),
            V::Float64(v) => v.to_sql(ty, out),
            V::Text(v) => v.to_sql(ty, out),
            V::Bytes(v) => v.to_sql(ty, out),
            V::Uuid(v) => uuid::Uuid::parse_str(v)?.to_sql(ty, out),
            V::Json(v) => v.to_sql(ty, out),
            V::Decimal(v) => Decimal::from_str_exact(v)?.to_sql(ty, out),
            V::Timestamp(t) => t.naive_utc().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn row(r: &postgres::Row) -> Result<Row, DbError> {
    let bad = |e: postgres::Error| DbError::new("", e.to_string());
    let mut out = Vec::new();
    for (i, col) in r.columns().iter().enumerate() {
        macro_rules! get {
            ($t:ty, $f:expr) => {
                r.try_get::<_, Option<$t>>(i)
                    .map_err(bad)?
                    .map_or(V::Null, $f)
            };
        }
        out.push(match *col.type_() {
            Type::BOOL => get!(bool, V::Bool),
            Type::INT2 => get!(i16, |v| V::Int32(v.into())),
            Type::INT4 => get!(i32, V::Int32),
            Type::INT8 => get!(i64, V::Int64),
            Type::FLOAT8 => get!(f64, V::Float64),
            Type::TEXT | Type::VARCHAR | Type::NAME => get!(String, V::Text),
            Type::UUID => get!(uuid::Uuid, |v| V::Uuid(v.to_string())),
            Type::JSONB | Type::JSON => get!(Value, V::Json),
            Type::NUMERIC => get!(Decimal, |v| V::Decimal(v.to_string())),
            Type::TIMESTAMP => get!(NaiveDateTime, |v| V::Timestamp(v.and_utc())),
            Type::TIMESTAMPTZ => get!(DateTime<Utc>, V::Timestamp),
            ref other => return Err(DbError::new("", format!("no mapping for {other}"))),
        });
    }
    Ok(Row(out))
}
