//! The operator's tool for a Spark-Ops database: migrations (`migrate`) and, with the
//! default `admin` feature, account administration (`admin`). The migration `Job` of a
//! deployment runs its binary, `sparkops-ops`; the local host (`sparkops up`) links only
//! `migrate`, to apply migrations before it serves.

#[cfg(feature = "admin")]
pub mod admin;
pub mod migrate;
