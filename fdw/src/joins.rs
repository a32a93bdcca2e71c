//! `features joins(auto)`: the source table's declared foreign keys, and
//! those of the tables they reference when two hops are asked, read as the
//! user who runs the INSERT (`cerebro_shared::joins` decides what to join).

use std::collections::BTreeMap;

use cerebro_shared::joins::{ForeignKey, Schema, Table};
use cerebro_shared::request::{source_query, SourceShape};
use cerebro_shared::spec::SqlKind;
use cerebro_shared::sql::quote_ident;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;

use crate::error::{CerebroError, Result};
use crate::sources::{resolve_source, Source};

/// The schema `joins(auto, hops)` looks at from `source`, which must be a
/// table (foreign keys are declared on tables only), and the source's shape.
/// `categories` are the source's columns its encodings make categories
/// whatever their type (`encode plot_id = category`).
pub(crate) fn read(
    client: &SpiClient<'_>,
    source: &str,
    hops: u32,
    categories: &[String],
) -> Result<(Schema, SourceShape)> {
    if source_query(source).is_some() {
        return Err(CerebroError::JoinsNeedTable { relation: "the source".into(), kind: "a query" });
    }
    let resolved = resolve_source(client, source)?;
    let shape = resolved.shape();
    let source = table(client, resolved, categories)?;
    let mut tables = BTreeMap::new();
    let mut frontier: Vec<String> = source.foreign_keys.iter().map(|k| k.table.clone()).collect();
    for hop in 1..=hops {
        let mut next = Vec::new();
        for relation in frontier {
            if tables.contains_key(&relation) {
                continue;
            }
            let t = table(client, resolve_source(client, &relation)?, &[])?;
            if hop < hops && t.readable {
                next.extend(t.foreign_keys.iter().map(|k| k.table.clone()));
            }
            tables.insert(relation, t);
        }
        frontier = next;
    }
    Ok((Schema { source, tables }, shape))
}

/// One table: its columns as the user sees them, its foreign keys, and for
/// a table the user may read its rows and each one-column key's distinct
/// values (what the pruning rule weighs). A column of `categories` is
/// categorical whatever its type. Anything but a table is refused before it
/// is read: foreign keys are declared on tables only.
fn table(client: &SpiClient<'_>, resolved: Source, categories: &[String]) -> Result<Table> {
    let relation = resolved.display.as_str();
    let readable = resolved.columns.iter().all(|c| c.readable);
    let columns: Vec<(String, Option<bool>)> = resolved
        .columns
        .iter()
        .map(|c| {
            let categorical = |k| matches!(k, SqlKind::Text | SqlKind::Boolean) || categories.contains(&c.name);
            (c.name.clone(), c.kind.map(categorical))
        })
        .collect();
    let row = client
        .select(
            "SELECT c.relname::text, c.relkind::text FROM pg_catalog.pg_class c
             WHERE c.oid = pg_catalog.to_regclass($1)",
            Some(1),
            &[relation.into()],
        )?
        .first();
    let (name, kind) = (row.get::<String>(1)?.unwrap_or_default(), row.get::<String>(2)?.unwrap_or_default());
    let not_a_table = match kind.as_str() {
        "r" | "p" => None,
        "v" => Some("a view"),
        "m" => Some("a materialized view"),
        "f" => Some("a foreign table"),
        _ => Some("a query"),
    };
    if let Some(kind) = not_a_table {
        return Err(CerebroError::JoinsNeedTable { relation: resolved.display, kind });
    }
    let mut foreign_keys = Vec::new();
    for row in client.select(
        "SELECT con.conname::text,
                ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(attnum, i)
                      JOIN pg_catalog.pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.attnum
                      ORDER BY k.i),
                pg_catalog.format('%I.%I', n.nspname, c.relname),
                ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(attnum, i)
                      JOIN pg_catalog.pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.attnum
                      ORDER BY k.i)
         FROM pg_catalog.pg_constraint con
         JOIN pg_catalog.pg_class c ON c.oid = con.confrelid
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
         WHERE con.conrelid = pg_catalog.to_regclass($1) AND con.contype = 'f'
         ORDER BY con.conname",
        None,
        &[relation.into()],
    )? {
        foreign_keys.push(ForeignKey {
            constraint: row.get::<String>(1)?.unwrap_or_default(),
            columns: row.get::<Vec<String>>(2)?.unwrap_or_default(),
            table: row.get::<String>(3)?.unwrap_or_default(),
            referenced: row.get::<Vec<String>>(4)?.unwrap_or_default(),
        });
    }
    let mut rows = 0;
    let mut distinct = BTreeMap::new();
    if readable {
        rows = count(client, &format!("SELECT count(*) FROM {relation}"))?;
        for key in &foreign_keys {
            if let [column] = key.columns.as_slice() {
                if columns.iter().any(|(c, kind)| c == column && *kind == Some(true)) && !distinct.contains_key(column)
                {
                    let sql = format!("SELECT count(DISTINCT {}) FROM {relation}", quote_ident(column));
                    distinct.insert(column.clone(), count(client, &sql)?);
                }
            }
        }
    }
    Ok(Table { relation: relation.to_owned(), name, rows, columns, foreign_keys, distinct, readable })
}

fn count(client: &SpiClient<'_>, sql: &str) -> Result<u64> {
    Ok(client.select(sql, Some(1), &[])?.first().get_one::<i64>()?.unwrap_or(0).max(0) as u64)
}

/// What the INSERT says it found: the joins searched and those pruned.
pub(crate) fn announce(plan: &cerebro_shared::joins::JoinPlan) {
    let kept: Vec<String> = plan.kept.iter().map(|j| format!("{} on {}", j.table, j.on.join(", "))).collect();
    notice!(
        "cerebro: joins(auto) searches with and without {} join(s){}{}",
        plan.kept.len(),
        if kept.is_empty() { String::new() } else { format!(": {}", kept.join("; ")) },
        if plan.pruned.is_empty() {
            String::new()
        } else {
            format!(
                "; pruned {}: {}",
                plan.pruned.len(),
                plan.pruned
                    .iter()
                    .map(|p| format!("{} on {} ({})", p.table, p.on.join(", "), p.why))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        }
    );
}
