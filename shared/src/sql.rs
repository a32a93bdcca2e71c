//! SQL text both sides build.
//!
//! Cerebro reads user columns in three places: the INSERT that freezes a
//! snapshot (as the user), the scan that scores (as the scorer) and
//! `cerebrod score` (as the daemon). The expressions here convert a column
//! to the built-in type Cerebro computes with without ever running code a
//! user wrote: every name is schema-qualified, so the caller's `search_path`
//! picks nothing, and an enum (the one kind of usable type an ordinary role
//! can own, and so give a cast of its own) goes to text through
//! `enum_out`, never through `pg_cast`.

/// Quotes an SQL identifier (always, so any name is safe).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The name of column `index` (0-based) of a snapshot table: snapshots
/// store source columns under neutral names (`c1`, `c2`, ...), kept in
/// `cerebro.snapshots.columns`, so the system catalogs, which every role
/// may read, show nothing of a model's columns.
pub fn snapshot_column(index: usize) -> String {
    format!("c{}", index + 1)
}

/// `expr` (an already quoted column) as `float8`: a built-in cast, since only
/// built-in numeric types are used as numbers (`SqlKind::classify`).
pub fn as_float8(expr: &str) -> String {
    format!("({expr})::pg_catalog.float8")
}

/// `expr` (an already quoted column of a type that is not built in, nor an
/// enum: a composite, a range, an extension's type) as text, through the
/// type's output function (which `format` calls; a role can create such a
/// type, and so a cast of its own from it, but not its output function).
pub fn as_output_text(expr: &str) -> String {
    format!("CASE WHEN ({expr}) IS NULL THEN NULL ELSE pg_catalog.format('%s', {expr}) END")
}

/// `expr` (an already quoted column of a built-in type, or of an enum) as
/// text, without a user-defined cast.
/// `enum_type` is the column's base type, schema-qualified and quoted, when
/// that is an enum: the value goes through the enum's output function
/// (a domain over an enum is first relabelled to it, which runs nothing).
pub fn as_text(expr: &str, enum_type: Option<&str>) -> String {
    match enum_type {
        Some(t) => format!("pg_catalog.textin(pg_catalog.enum_out(({expr})::{t}))"),
        None => format!("({expr})::pg_catalog.text"),
    }
}

/// The channel an INSERT notifies when it queues a job, and cerebrod
/// LISTENs on. The notification has no payload: anyone may LISTEN, and
/// cerebrod claims whatever is queued whatever woke it.
pub const JOBS_CHANNEL: &str = "cerebro_jobs";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted_and_escaped() {
        assert_eq!(quote_ident("churn"), "\"churn\"");
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
    }

    #[test]
    fn conversions_are_qualified_and_enums_never_use_a_cast() {
        assert_eq!(as_float8("\"x\""), "(\"x\")::pg_catalog.float8");
        assert_eq!(as_text("\"x\"", None), "(\"x\")::pg_catalog.text");
        let e = as_text("\"mood\"", Some("\"app\".\"mood\""));
        assert_eq!(e, "pg_catalog.textin(pg_catalog.enum_out((\"mood\")::\"app\".\"mood\"))");
        assert_eq!(snapshot_column(0), "c1");
        let o = as_output_text("\"k\"");
        assert!(o.contains("pg_catalog.format('%s', \"k\")") && !o.contains("::"), "{o}");
    }
}
