//! The contract between the `cerebro` extension (fdw/) and the daemon `cerebrod`.
//!
//! Everything both sides must agree on lives here and nowhere else:
//! - [`spec`]: what a training request may say, validated into domain types;
//! - [`protocol`]: the framed control messages on the local socket;
//! - [`batch`]: the column-major layout of a scoring batch in shared memory;
//! - [`error`]: stable error codes that cross the wire (mapped to SQLSTATEs
//!   only in fdw/);
//! - [`request`]: the rules of a request that creates model versions (features,
//!   a candidate's or a change's options, an import's graph), apart from the database;
//! - [`sql`]: the bits of SQL text both sides write;
//! - [`limits`]: how large a model and how much work a job is, estimated at INSERT;
//! - [`joins`]: which joins `features joins(auto)` follows from declared foreign keys, which it prunes, and the query;
//! - [`importance`]: a version's permutation importance per source column, as stored;
//! - [`meta`]: a task's meta-features, how far two tasks are, and what the archive recommends for one;
//! - [`surrogate`]: a shallow decision tree distilled from a version, as rules and SQL;
//! - [`pg_numeric`]: PostgreSQL's `numeric` read as an `f64` from its bytes.
//!
//! This crate has no pgrx and no async runtime so that both sides, and plain
//! `cargo test`, can use it.

pub mod batch;
pub mod error;
pub mod explanation;
pub mod importance;
pub mod joins;
pub mod jsonb;
pub mod limits;
pub mod meta;
pub mod mst;
pub mod onnx_graph;
pub mod pg_numeric;
pub mod protocol;
pub mod provenance;
pub mod request;
pub mod spec;
pub mod sql;
pub mod surrogate;
