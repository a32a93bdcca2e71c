//! A selection's later rounds (`search halving(n, rounds = r)`): when every
//! candidate of a round is done, the next `n` draws of the same seeded
//! sequence are queued on the data the first round froze, while the budget
//! is likely to hold one more round and rounds still find better
//! candidates (docs/selection.md, "Rounds").
//!
//! Queued by cerebrod's call to `cerebro.finish_selection`, for the role
//! that started the selection: a round reads no user data (its candidates
//! learn from the first round's snapshot) and checks each candidate's
//! options and size as an INSERT does, leaving out one that fails.

use cerebro_shared::mst::{self, RoundsStanding, SelectionPlan};
use cerebro_shared::request::merge_options;
use cerebro_shared::spec::{Feature, Task, TrainOptions};
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

use crate::catalog::{allocate_version, queue_copy, CopyOf};
use crate::error::{CerebroError, Result};
use crate::gucs;

/// The round a version was drawn in (the first round's versions say none).
const ROUND_OF: &str = "coalesce((m.request->'selection'->>'round')::int, 1)";

/// A round drawn and checked, ready to queue.
pub(crate) struct Round {
    selection: i64,
    number: i32,
    /// The first candidate's version: every new one copies its row.
    template: i32,
    /// Each candidate's place in the selection, request, options and features.
    candidates: Vec<(usize, serde_json::Value, TrainOptions, Vec<Feature>)>,
}

/// The next round of `selection` (spec `spec`), if its plan asks for rounds
/// and one more is due. Reads only, so that a round that cannot be drawn
/// leaves nothing behind. As the extension owner.
pub(crate) fn draw_next(
    client: &mut SpiClient<'_>,
    selection: i64,
    spec: &str,
    plan: &SelectionPlan,
) -> Result<Option<Round>> {
    if plan.rounds.is_none() {
        return Ok(None);
    }
    let Some(s) = standing(client, selection)? else { return Ok(None) };
    if !plan.next_round_due(&s) {
        return Ok(None);
    }
    let number = s.last_round as i32 + 1;
    let text = plan.searched.as_deref().unwrap_or(mst::resolve(spec));
    let parsed = mst::parse(text).map_err(CerebroError::Selection)?;
    let limit = gucs::MAX_CANDIDATES.get().max(1) as u128;
    let drawn = parsed.expand_round(text, limit, number as u64).map_err(CerebroError::Selection)?;

    // Every candidate of a selection with rounds shares source and snapshot:
    // each new one is the first candidate's request with its own options,
    // and the features the first round froze less those it leaves out.
    let row = client
        .select(
            "SELECT m.version, m.request, m.task, m.class_labels, s.row_count, s.columns
             FROM cerebro.model_versions m JOIN cerebro.snapshots s ON s.id = m.snapshot_id
             WHERE m.selection_id = $1 AND NOT m.request ? 'ensemble' ORDER BY m.version LIMIT 1",
            Some(1),
            &[selection.into()],
        )?
        .first();
    let Some(template) = row.get::<i32>(1)? else { return Ok(None) };
    let request = row.get::<JsonB>(2)?.map(|j| j.0).unwrap_or_default();
    let unreadable = |what: &str, e: String| CerebroError::Catalog(format!("version {template}'s {what}: {e}"));
    let task: Task = serde_json::from_value(serde_json::Value::String(row.get::<String>(3)?.unwrap_or_default()))
        .map_err(|e| unreadable("task", e.to_string()))?;
    let class_labels: Vec<String> = row.get::<Vec<String>>(4)?.unwrap_or_default();
    let rows = row.get::<i64>(5)?.unwrap_or(0).max(0) as u64;
    let frozen: Vec<String> = row.get::<Vec<String>>(6)?.unwrap_or_default();
    let written = request["options"].as_object().cloned().unwrap_or_default();
    let features = first_round_features(client, selection, &frozen)?;

    let per_round = drawn.len();
    let mut candidates = Vec::with_capacity(per_round);
    for (i, candidate) in drawn.iter().enumerate() {
        let left_out = candidate.left_out();
        let features: Vec<Feature> = features.iter().filter(|f| !left_out.contains(&f.name)).cloned().collect();
        if features.is_empty() {
            notice!(
                "cerebro: selection {selection}, round {number}: a candidate is left out: it leaves out every feature"
            );
            continue;
        }
        let mut options = written.clone();
        merge_options(&mut options, &candidate.options);
        let options_json = serde_json::Value::Object(options);
        let checked = TrainOptions::from_json(Some(&options_json))
            .and_then(|o| o.check_against(&features, task, &class_labels).map(|()| o))
            .map_err(CerebroError::from)
            .and_then(|o| crate::limits::check_model(&o, &features, task, class_labels.len(), rows).map(|()| o));
        let options = match checked {
            Ok(o) => o,
            Err(e) => {
                notice!("cerebro: selection {selection}, round {number}: a candidate is left out: {e}");
                continue;
            }
        };
        let place = (number as usize - 1) * per_round + i + 1;
        let mut asked = request.clone();
        asked["options"] = options_json;
        asked["selection"] = serde_json::json!({ "id": selection, "candidate": place, "round": number });
        candidates.push((place, asked, options, features));
    }
    if candidates.is_empty() {
        return Ok(None);
    }
    Ok(Some(Round { selection, number, template, candidates }))
}

/// Queues `round`'s candidates as versions of `name` for `by`, each
/// recorded and audited as an INSERT's; returns how many.
pub(crate) fn queue(client: &mut SpiClient<'_>, round: Round, name: &str, by: &str) -> Result<usize> {
    let Round { selection, number, template, candidates } = round;
    let queued = candidates.len();
    for (place, asked, options, features) in candidates {
        let version = allocate_version(client, name)?;
        let copy = CopyOf {
            features: Some(serde_json::to_value(&features).expect("features serialise")),
            options: Some(options.to_json()),
            epochs: Some(options.epochs as i32),
            request: Some(asked),
            in_selection: true,
            reproduces: false,
        };
        let detail = serde_json::json!({ "selection": selection, "round": number, "candidate": place });
        queue_copy(client, name, template, version, by, copy, detail)?
            .expect("the first candidate's row was just read");
    }
    client.update(
        "UPDATE cerebro.selections SET candidates = candidates + $2 WHERE id = $1",
        None,
        &[selection.into(), (queued as i32).into()],
    )?;
    Ok(queued)
}

/// Every feature any first-round candidate of `selection` learns from, in
/// the order its snapshot froze them (`frozen`, the snapshot's columns).
fn first_round_features(client: &mut SpiClient<'_>, selection: i64, frozen: &[String]) -> Result<Vec<Feature>> {
    let rows = client.select(
        &format!(
            "SELECT DISTINCT m.features FROM cerebro.model_versions m
             WHERE m.selection_id = $1 AND NOT m.request ? 'ensemble' AND {ROUND_OF} = 1"
        ),
        None,
        &[selection.into()],
    )?;
    let mut all: Vec<Feature> = Vec::new();
    for row in rows {
        let features: Vec<Feature> = serde_json::from_value(row.get::<JsonB>(1)?.map(|j| j.0).unwrap_or_default())
            .map_err(|e| CerebroError::Catalog(format!("selection {selection}'s features: {e}")))?;
        for f in features {
            if !all.iter().any(|seen| seen.name == f.name) {
                all.push(f);
            }
        }
    }
    all.sort_by_key(|f| frozen.iter().position(|c| c == &f.name));
    Ok(all)
}

/// Where `selection`'s rounds stand, read from its versions; None while
/// none of its candidates is ready.
fn standing(client: &mut SpiClient<'_>, selection: i64) -> Result<Option<RoundsStanding>> {
    let row = client
        .select(
            &format!(
                "WITH c AS (SELECT m.*, {ROUND_OF} AS round FROM cerebro.model_versions m
                            WHERE m.selection_id = $1 AND NOT m.request ? 'ensemble'),
                      last AS (SELECT max(round) AS round FROM c)
                 SELECT (SELECT round FROM last),
                        (SELECT c.round FROM cerebro.leaderboard l JOIN c ON c.version = l.version
                         WHERE l.selection = $1 AND l.status = 'ready' ORDER BY l.rank, l.version LIMIT 1),
                        extract(epoch FROM now() - s.created_at)::float8, s.spent_epochs,
                        (SELECT extract(epoch FROM now() - min(c.created_at))::float8 FROM c, last
                         WHERE c.round = last.round),
                        (SELECT coalesce(sum(c.epoch), 0)::bigint FROM c, last WHERE c.round = last.round)
                 FROM cerebro.selections s WHERE s.id = $1"
            ),
            Some(1),
            &[selection.into()],
        )?
        .first();
    let Some(best_round) = row.get::<i32>(2)? else { return Ok(None) };
    let whole = |n: i64| n.max(0) as u64;
    Ok(Some(RoundsStanding {
        last_round: row.get::<i32>(1)?.unwrap_or(1).max(1) as u32,
        best_round: best_round.max(1) as u32,
        elapsed_seconds: row.get::<f64>(3)?.unwrap_or(0.0),
        spent_epochs: whole(row.get::<i64>(4)?.unwrap_or(0)),
        round_seconds: row.get::<f64>(5)?.unwrap_or(0.0),
        round_epochs: whole(row.get::<i64>(6)?.unwrap_or(0)),
    }))
}
