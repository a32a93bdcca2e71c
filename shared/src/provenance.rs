//! What trained a model version: `cerebro.model_versions.trained_with`.
//!
//! cerebrod writes it when a version becomes ready; users, the views
//! `cerebro.leaderboard` (`stopped`) and `cerebro.lineage` (`warm_start`)
//! and the end-to-end tests read its keys by name, so the JSON shape is
//! part of the catalog: a field renamed here is a key renamed there.

use serde::{Deserialize, Serialize};

use crate::spec::TargetTransform;

/// `cerebro.model_versions.trained_with`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainedWith {
    /// cerebrod's version.
    pub cerebrod: String,
    /// The git commit cerebrod was built from (`-modified` when built from
    /// a changed tree).
    pub commit: String,
    /// Where it trained, in words ("cpu, 1 thread", "cuda:0 NVIDIA H100 ...").
    pub device: String,
    /// How many models its stack trained at once.
    pub stack: usize,
    /// What it took from its parent, for a derived model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_start: Option<WarmStart>,
    /// Why it stopped before its own end (a selection's halving or budget);
    /// it kept its best weights so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// The transform `target_transform = "auto"` chose for a regression's
    /// target (`"log"` or `"standardize"`); absent when the options named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_transform: Option<TargetTransform>,
    /// For an ensemble: the versions it averages and their weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<Ensemble>,
}

/// `cerebro.model_versions.request->'ensemble'`: an ensemble version asks
/// for the versions it may weigh, best first (written when its selection's
/// candidates are done; a reproduction weighs the same ones again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnsembleRequest {
    /// The selection whose candidates they are.
    pub selection: i64,
    /// Versions of the same model, on one snapshot and one validation split.
    pub pool: Vec<i32>,
}

/// What greedy ensemble selection chose: `trained_with->'ensemble'`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ensemble {
    /// The members with a weight above 0, best single model first; the
    /// weights sum to 1.
    pub members: Vec<EnsembleMember>,
    /// How many of the pool were weighed.
    pub pool: usize,
    /// Greedy steps taken (each added one member's share).
    pub rounds: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnsembleMember {
    pub version: i32,
    pub weight: f64,
}

/// What a warm start copied from the parent version's weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WarmStart {
    pub from_version: i32,
    /// Dense layers after the input layer copied whole, of the child's.
    pub layers: usize,
    pub of_layers: usize,
    /// Input-layer columns that kept the parent's weights, of the child's.
    pub input_columns: usize,
    pub of_input_columns: usize,
    /// Embedding tables copied.
    pub embeddings: usize,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn plain() -> TrainedWith {
        TrainedWith {
            cerebrod: "0.2.0".into(),
            commit: "0123456789abcdef0123456789abcdef01234567".into(),
            device: "cpu, 1 thread".into(),
            stack: 1,
            warm_start: None,
            stopped: None,
            target_transform: None,
            ensemble: None,
        }
    }

    #[test]
    fn the_json_has_the_keys_the_catalog_reads() {
        let with = plain();
        assert_eq!(
            serde_json::to_value(&with).unwrap(),
            json!({
                "cerebrod": "0.2.0",
                "commit": "0123456789abcdef0123456789abcdef01234567",
                "device": "cpu, 1 thread",
                "stack": 1,
            }),
            "keys left out when unset, not null"
        );

        let full = TrainedWith {
            stack: 4,
            warm_start: Some(WarmStart {
                from_version: 1,
                layers: 1,
                of_layers: 3,
                input_columns: 20,
                of_input_columns: 21,
                embeddings: 0,
            }),
            stopped: Some("the selection's budget of 10 epochs was spent (after epoch 2)".into()),
            target_transform: Some(TargetTransform::Log),
            ensemble: Some(Ensemble {
                members: vec![EnsembleMember { version: 3, weight: 0.75 }, EnsembleMember { version: 1, weight: 0.25 }],
                pool: 8,
                rounds: 4,
            }),
            ..with
        };
        let value = serde_json::to_value(&full).unwrap();
        assert_eq!(
            value,
            json!({
                "cerebrod": "0.2.0",
                "commit": "0123456789abcdef0123456789abcdef01234567",
                "device": "cpu, 1 thread",
                "stack": 4,
                "warm_start": {
                    "from_version": 1, "layers": 1, "of_layers": 3,
                    "input_columns": 20, "of_input_columns": 21, "embeddings": 0,
                },
                "stopped": "the selection's budget of 10 epochs was spent (after epoch 2)",
                "target_transform": "log",
                "ensemble": {"members": [{"version": 3, "weight": 0.75}, {"version": 1, "weight": 0.25}], "pool": 8, "rounds": 4},
            })
        );
        assert_eq!(serde_json::from_value::<TrainedWith>(value).unwrap(), full);
    }
}
