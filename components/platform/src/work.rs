//! What every piece of work has, a request or a background job (a step in the executor,
//! a trace export, a tick): an id for its log lines, the time it started, a database
//! connection opened on first use, transactions on it, and handing claimed steps to
//! executors. The HTTP request pipeline's [`crate::pipeline::Ctx`] adds authentication,
//! rate limits and idempotency on top; background work needs none of that.

use sparkops_core::db as core_db;
use sparkops_core::error::ApiError;

use crate::db::Db;

pub struct Work {
    /// The id its log lines carry: the request's, or one the job makes.
    pub request_id: String,
    pub now: chrono::DateTime<chrono::Utc>,
    db: Option<Db>,
}

impl Work {
    pub fn new(request_id: String) -> Self {
        Self {
            request_id,
            now: chrono::Utc::now(),
            db: None,
        }
    }

    /// The database connection, opened on first use.
    pub fn db(&mut self) -> Result<&Db, ApiError> {
        if self.db.is_none() {
            // A database that cannot be reached is a 503 to retry, logged here with its
            // cause; any other failure is a 500, which the pipeline logs.
            let db = Db::open_default().map_err(|e| {
                if e.is_unavailable() {
                    crate::log_line(&serde_json::json!({"level": "warn",
                        "msg": "opening the database", "request_id": self.request_id,
                        "error": e.to_string()}));
                    ApiError::from(e)
                } else {
                    ApiError::internal(format!("opening the database: {e}"))
                }
            })?;
            self.db = Some(db);
        }
        Ok(self.db.as_ref().expect("just opened"))
    }

    /// Gives the connection back (to Spin's pool) before slow work that needs none, such
    /// as an outbound call; the next [`Work::db`] opens another.
    pub fn release_db(&mut self) {
        self.db = None;
    }

    /// Hands the steps an advance of `run_id` claimed to executors, after giving the
    /// connection back: an executor needs one to accept a step, and work holding one while
    /// it waits for executors could hold the last of the pool.
    pub fn dispatch(&mut self, run_id: &str, claimed: &[sparkops_engine::Claim]) {
        if !claimed.is_empty() {
            self.release_db();
            crate::orchestrate::dispatch(run_id, claimed);
        }
    }

    /// A new UUIDv7, of the time the work started.
    pub fn new_id(&self) -> String {
        crate::id_at(self.now)
    }

    /// Runs `f` in one transaction on the connection (see
    /// [`sparkops_core::db::transaction`]), with the work at hand for ids and time.
    pub fn transaction<T>(
        &mut self,
        f: impl FnOnce(&core_db::Tx<'_, Db>, &Work) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.db()?;
        let db = self.db.take().expect("opened above");
        let result = core_db::transaction(&db, |tx| f(tx, self));
        self.db = Some(db);
        result
    }
}
