//! A selection's ensemble: once its candidates are done, one more version
//! of the model that averages the best of them. Here it is only queued,
//! with the versions it may weigh (its pool); cerebrod weighs them by
//! greedy ensemble selection on their validation rows and builds its graph.
//!
//! It needs no snapshot of its own and reads nothing as a user: it is the
//! candidates', trained on their snapshot, queued by cerebrod's call to
//! `cerebro.finish_selection` for the role that started the selection.

use cerebro_shared::provenance::EnsembleRequest;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

use crate::catalog::{allocate_version, first, queue_copy, CopyOf};
use crate::error::Result;

/// Queues the ensemble of `selection` of model `name` for `by`, over at most
/// `pool_size` of its best ready candidates, unless it has one already or
/// fewer than two candidates can share it. Returns its version. As the
/// extension owner, in the transaction that holds the selection's row.
pub(crate) fn queue(
    client: &mut SpiClient<'_>,
    selection: i64,
    name: &str,
    by: &str,
    pool_size: u32,
) -> Result<Option<i32>> {
    let asked = first::<bool>(
        client,
        "SELECT EXISTS (SELECT 1 FROM cerebro.model_versions WHERE selection_id = $1 AND request ? 'ensemble')",
        &[selection.into()],
        1,
    )?;
    if asked == Some(true) {
        return Ok(None);
    }
    // The pool: the best ready candidates, in the leaderboard's order, that
    // the best one's validation rows also validate (same snapshot, features
    // and split), since the weights are chosen on those rows.
    let rows = client.select(
        "WITH ranked AS (
             SELECT m.version, m.snapshot_id, m.features, m.options, m.request, l.rank
             FROM cerebro.leaderboard l
             JOIN cerebro.model_versions m ON m.selection_id = l.selection AND m.version = l.version
             WHERE l.selection = $1 AND l.status = 'ready' AND m.import_layout IS NULL AND m.metrics IS NOT NULL),
         best AS (SELECT * FROM ranked ORDER BY rank, version LIMIT 1)
         SELECT r.version, r.request FROM ranked r, best b
         WHERE r.snapshot_id = b.snapshot_id AND r.features = b.features
           AND r.options->'split' IS NOT DISTINCT FROM b.options->'split'
           AND r.options->'seed' IS NOT DISTINCT FROM b.options->'seed'
           AND r.options->'validation_fraction' IS NOT DISTINCT FROM b.options->'validation_fraction'
         ORDER BY r.rank, r.version LIMIT $2",
        None,
        &[selection.into(), (pool_size as i64).into()],
    )?;
    let mut pool: Vec<i32> = Vec::new();
    let mut best_request = None;
    for row in rows {
        pool.extend(row.get::<i32>(1)?);
        if best_request.is_none() {
            best_request = row.get::<JsonB>(2)?.map(|j| j.0);
        }
    }
    let (Some(mut asked), 2..) = (best_request, pool.len()) else { return Ok(None) };
    // Everything a job reads (task, target, features, labels, options,
    // snapshot) is the best candidate's, which every member shares; its
    // request, less its place among the candidates, names the pool.
    let detail = serde_json::json!({ "ensemble_of": pool, "selection": selection });
    let request = EnsembleRequest { selection, pool };
    asked["selection"] = serde_json::json!({ "id": selection });
    asked["ensemble"] = serde_json::to_value(&request).expect("a request serialises");
    let version = allocate_version(client, name)?;
    let copy = CopyOf { epochs: Some(0), request: Some(asked), in_selection: true, ..CopyOf::default() };
    queue_copy(client, name, request.pool[0], version, by, copy, detail)?
        .expect("the best candidate's row was just read");
    Ok(Some(version))
}
