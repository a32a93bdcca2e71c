//! Export equivalence: ONNX Runtime on the exported file gives what the
//! engine gives, on held-out rows with NULLs, infinities, out-of-range
//! values and never-seen categories.

mod common;

use cerebro_daemon::catalog::{Artifact, NativeParts};
use cerebro_daemon::engine::Compute;
use cerebro_daemon::native::{disagreement, NativeModel, AGREEMENT};
use cerebro_daemon::onnx::export;
use cerebro_daemon::scoring::{InputKind, OnnxRuntime, ScoringError, ScoringModel};
use cerebro_daemon::train::{train, train_group, Control, TrainedModel};
use cerebro_shared::batch::{ColumnData, ColumnRef, NO_LABEL};
use cerebro_shared::spec::{Feature, FeatureKind, Task, TrainOptions, TrainingPlan};
use serde_json::json;

fn columns(n: usize, offset: usize) -> Vec<ColumnData> {
    let mut num = Vec::new();
    let mut cat = Vec::new();
    let mut flag = Vec::new();
    for i in offset..offset + n {
        num.push(match i % 11 {
            0 => None,
            // Only held-out rows see values the network treats as missing.
            3 if offset > 0 => Some([f64::INFINITY, f64::NEG_INFINITY, 1e300, f64::NAN][i % 4]),
            _ => Some(((i * 37) % 101) as f64 / 10.0 - 5.0),
        });
        cat.push(match i % 13 {
            0 => None,
            // Only held-out rows (offset > 0) see this value.
            1 if offset > 0 => Some("never seen".to_string()),
            _ => Some(["dsl", "fiber", "none", "sat"][i % 4].to_string()),
        });
        flag.push(Some(if i % 3 == 0 { "true" } else { "false" }.to_string()));
    }
    vec![ColumnData::Float64(num), ColumnData::Text(cat), ColumnData::Text(flag)]
}

fn features() -> Vec<Feature> {
    vec![
        Feature { name: "monthly charges".into(), kind: FeatureKind::Numeric },
        Feature { name: "internet".into(), kind: FeatureKind::Categorical },
        Feature { name: "paperless".into(), kind: FeatureKind::Categorical },
    ]
}

fn plan(task: Task, options: serde_json::Value) -> (TrainingPlan, ColumnData) {
    let train_cols = columns(400, 0);
    let num = match &train_cols[0] {
        ColumnData::Float64(v) => v.clone(),
        _ => unreachable!(),
    };
    let (target, labels): (ColumnData, Vec<String>) = match task {
        Task::Binary => (
            ColumnData::Text(num.iter().map(|v| Some((v.unwrap_or(0.0) > 0.0).to_string())).collect()),
            vec!["false".into(), "true".into()],
        ),
        Task::Multiclass => (
            ColumnData::Text(num.iter().map(|v| Some(format!("c{}", (v.unwrap_or(0.0) + 5.0) as usize / 4))).collect()),
            vec!["c0".into(), "c1".into(), "c2".into()],
        ),
        Task::Regression => {
            (ColumnData::Float64(num.iter().map(|v| Some(v.unwrap_or(1.0) * 3.0 + 100.0)).collect()), vec![])
        }
    };
    let mut options = TrainOptions::from_json(Some(&options)).expect("valid options");
    options.epochs = 5;
    let plan = TrainingPlan { task, target: "y".into(), features: features(), class_labels: labels, options };
    (plan, target)
}

fn trained(task: Task, options: serde_json::Value) -> TrainedModel {
    let (plan, target) = plan(task, options);
    train(&plan, &columns(400, 0), &target, Compute::cpu(1), &mut |_| Control::Continue).expect("training succeeds")
}

/// The ONNX file of `model`, scored by ONNX Runtime, equals the engine's
/// outputs on held-out rows (NULLs and never-seen categories included).
fn check_agreement(rt: &OnnxRuntime, model: &TrainedModel, what: &str) {
    let held_out = columns(300, 10_000);
    let task = model.task;
    let bytes = export(model, &[("cerebro.model", "test".into())]).unwrap();
    let onnx = ScoringModel::load(rt, &bytes).unwrap();
    assert_eq!(
        onnx.inputs().iter().map(|(n, k)| (n.as_str(), *k)).collect::<Vec<_>>(),
        vec![("monthly charges", InputKind::Float), ("internet", InputKind::Text), ("paperless", InputKind::Text)]
    );
    // The backend's protobuf reader sees the graph as ONNX Runtime does.
    let signature = cerebro_shared::onnx_graph::read_signature(&bytes).unwrap();
    let read: Vec<(&str, i32, Vec<Option<i64>>)> =
        signature.inputs.iter().map(|i| (i.name.as_str(), i.elem_type, i.dims.clone())).collect();
    use cerebro_shared::onnx_graph::{FLOAT, STRING};
    assert_eq!(
        read,
        vec![
            ("monthly charges", FLOAT, vec![None, Some(1)]),
            ("internet", STRING, vec![None, Some(1)]),
            ("paperless", STRING, vec![None, Some(1)])
        ]
    );
    assert_eq!(signature.outputs.len(), 1);
    let engine = model.outputs(&held_out).unwrap();
    let (runtime, width) = onnx.run(&held_out).unwrap();
    assert_eq!(engine.len(), runtime.len(), "{what}");
    assert_eq!(width, if task == Task::Multiclass { 3 } else { 1 });
    for (i, (e, r)) in engine.iter().zip(&runtime).enumerate() {
        assert!((e - r).abs() <= 1e-5 * e.abs().max(1.0), "{what} row {i}: engine {e} onnx {r}");
    }

    let (scores, labels) = onnx.score(&held_out).unwrap();
    assert_eq!(scores.len(), 300);
    match task {
        Task::Binary => assert!(labels.iter().zip(&scores).all(|(l, s)| *l == (*s >= 0.5) as u32)),
        Task::Multiclass => assert!(labels.iter().all(|l| *l < 3)),
        Task::Regression => assert!(labels.iter().all(|l| *l == NO_LABEL)),
    }
}

#[test]
fn onnx_runtime_agrees_with_the_engine_for_every_head_layer_and_encoding() {
    let Some(rt) = common::onnx_runtime() else { return };
    let cases = [
        (Task::Binary, json!({"hidden": [8, 4]})),
        (Task::Multiclass, json!({"hidden": [8, 4]})),
        (Task::Regression, json!({"hidden": [8, 4]})),
        (
            Task::Binary,
            json!({"hidden": [8], "activation": "gelu", "residual_blocks": 2, "norm": "layer", "dropout": 0.2}),
        ),
        (Task::Binary, json!({"hidden": [8, 6], "activation": "silu", "norm": "batch", "class_weights": "balanced"})),
        (Task::Multiclass, json!({"hidden": [8], "residual_blocks": 1, "norm": "batch", "dropout": 0.1})),
        (Task::Regression, json!({"hidden": [8], "activation": "tanh", "loss": "huber", "norm": "layer"})),
        // Embeddings (never-seen values take the zero row), PLE and quantiles.
        (
            Task::Binary,
            json!({"hidden": [8], "numeric_encoding": "ple", "encodings": {"internet": 3, "paperless": "embedding"}}),
        ),
        (
            Task::Multiclass,
            json!({"hidden": [8], "encodings": {"monthly charges": "quantile", "internet": "embedding"}}),
        ),
        (Task::Regression, json!({"hidden": [], "bins": 5, "numeric_encoding": "ple", "onehot_max": 2})),
        // Robust scaling of a column with NULLs (and, held out, infinities
        // and values beyond f32), by default and per column.
        (Task::Regression, json!({"hidden": [], "numeric_encoding": "robust"})),
        (Task::Binary, json!({"hidden": [8], "encodings": {"monthly charges": "robust", "internet": "embedding"}})),
        // Mini-ensembles: one graph averaging three networks.
        (Task::Binary, json!({"hidden": [8], "members": 3})),
        (Task::Regression, json!({"hidden": [8], "members": 2, "numeric_encoding": "periodic"})),
        // Periodic embeddings, after a categorical one, for every head.
        (
            Task::Binary,
            json!({"hidden": [8], "numeric_encoding": "periodic", "periodic_sigma": 1.0,
                   "encodings": {"internet": "embedding"}}),
        ),
        (Task::Multiclass, json!({"hidden": [8], "encodings": {"monthly charges": "periodic"}, "periodic_dim": 3})),
        (
            Task::Regression,
            json!({"hidden": [], "numeric_encoding": "periodic", "periodic_frequencies": 5, "periodic_sigma": 3.0}),
        ),
    ];
    for (task, options) in cases {
        let what = format!("{task} {options}");
        let model = trained(task, options.clone());
        check_agreement(&rt, &model, &what);
        check_native(&rt, &model, &plan(task, options).0.options, &what);
    }
}

/// The engine's copy of the exported file (its weights read back from it)
/// scores as ONNX Runtime does the file, on held-out rows and on its probe
/// rows, and a version whose catalog parts are given is scored by it.
fn check_native(rt: &OnnxRuntime, model: &TrainedModel, options: &TrainOptions, what: &str) {
    let bytes = export(model, &[]).unwrap();
    let classes = model.class_labels.len();
    let native = NativeModel::from_onnx(&bytes, model.pipeline.clone(), options, model.task, classes).unwrap();
    let onnx = ScoringModel::load(rt, &bytes).unwrap();
    let values = model.task == Task::Regression;
    // More rows than the engine runs through the network at a time (512),
    // the last chunk partial.
    for rows in [columns(1_300, 10_000), native.probe()] {
        let refs: Vec<ColumnRef<'_>> = rows.iter().map(ColumnData::as_ref).collect();
        let (own, width) = native.run(&refs).unwrap();
        let (runtime, runtime_width) = onnx.run(&rows).unwrap();
        assert_eq!(width, runtime_width, "{what}");
        let apart = disagreement(&runtime, &own, values);
        assert!(apart <= AGREEMENT, "{what}: the engine's copy is {apart:e} away from ONNX Runtime");
    }
    let parts = NativeParts { pipeline: model.pipeline.clone(), options: options.clone(), classes };
    let artifact = Artifact {
        label: "model \"test\" version 1".into(),
        sha256: String::new(),
        bytes,
        import_layout: None,
        task: model.task,
        native: Some(parts),
        members: Vec::new(),
    };
    let scoring = ScoringModel::from_artifact(rt, &artifact).unwrap();
    assert!(scoring.native(), "{what}: the version is scored by the engine");
    let held_out = columns(300, 10_000);
    assert_eq!(scoring.score(&held_out).unwrap().1, onnx.score(&held_out).unwrap().1, "{what}: the same labels");
    check_completeness(&scoring, &held_out, model.task, what);
    let off = ScoringModel::from_artifact(&rt.clone().with_native(false), &artifact).unwrap();
    assert!(!off.native(), "{what}: native_scoring = false leaves it to ONNX Runtime");
    check_completeness(&off, &held_out, model.task, &format!("{what}, scored by ONNX Runtime"));
}

/// Integrated gradients are complete: each row's contributions add up to
/// its score minus the baseline's, to 1e-3 (relative to the value, for
/// regression), NULLs, non-finite numbers and never-seen categories
/// included; and the baseline row scores the baseline.
fn check_completeness(scoring: &ScoringModel, rows: &[ColumnData], task: Task, what: &str) {
    let columns = rows.len();
    let refs: Vec<ColumnRef<'_>> = rows.iter().map(ColumnData::as_ref).collect();
    let values = scoring.explain(&refs, columns).unwrap();
    let (scores, _) = scoring.score(rows).unwrap();
    assert_eq!(values.len(), scores.len() * (1 + columns), "{what}");
    for (r, (row, score)) in values.chunks_exact(1 + columns).zip(&scores).enumerate() {
        let total = row[0] + row[1..].iter().sum::<f64>();
        let scale = if task == Task::Regression { score.abs().max(1.0) } else { 1.0 };
        assert!(
            (total - score).abs() <= 1e-3 * scale,
            "{what} row {r}: baseline {} + contributions {:?} = {total}, score {score}",
            row[0],
            &row[1..]
        );
    }
    assert!(scoring.explain(&refs, columns + 1).is_err(), "{what}: the columns explained are the model's");
}

/// A file whose weights are not the network its options describe stays
/// with ONNX Runtime.
#[test]
fn a_file_that_is_not_the_network_of_its_options_is_left_to_onnx_runtime() {
    let Some(rt) = common::onnx_runtime() else { return };
    let model = trained(Task::Binary, json!({"hidden": [8]}));
    let bytes = export(&model, &[]).unwrap();
    let other = plan(Task::Binary, json!({"hidden": [6]})).0.options;
    let err = NativeModel::from_onnx(&bytes, model.pipeline.clone(), &other, Task::Binary, 2).unwrap_err();
    assert!(err.to_string().contains("weight"), "{err}");
    let parts = NativeParts { pipeline: model.pipeline.clone(), options: other, classes: 2 };
    let artifact = Artifact {
        label: "model \"test\" version 1".into(),
        sha256: String::new(),
        bytes,
        import_layout: None,
        task: Task::Binary,
        native: Some(parts),
        members: Vec::new(),
    };
    let scoring = ScoringModel::from_artifact(&rt, &artifact).unwrap();
    assert!(!scoring.native());
    assert_eq!(scoring.score(&columns(50, 10_000)).unwrap().0.len(), 50, "ONNX Runtime still scores it");
    let rows = columns(5, 10_000);
    let refs: Vec<ColumnRef<'_>> = rows.iter().map(ColumnData::as_ref).collect();
    let err = scoring.explain(&refs, 3).unwrap_err();
    assert!(matches!(err, ScoringError::NotExplainable(_)), "without the engine's copy, no explanation: {err}");
}

/// Robust scaling exports exactly: a column with outliers (far beyond the
/// training rows' when held out), one whose quartiles coincide (the scale
/// falls back to half the range) and one with NULLs.
#[test]
fn robust_scaling_agrees_with_the_engine_on_outliers_nulls_and_a_zero_iqr() {
    use cerebro_daemon::features::Encoder;
    let Some(rt) = common::onnx_runtime() else { return };
    let cols = |n: usize, offset: usize| -> Vec<ColumnData> {
        let (mut skewed, mut spiky, mut holes) = (Vec::new(), Vec::new(), Vec::new());
        for i in offset..offset + n {
            let base = ((i * 37) % 101) as f64 / 10.0;
            skewed.push(Some(match (i % 17, offset > 0) {
                (0, false) => 1e4,
                (5, false) => -2e5,
                (0, true) => 1e12,
                (5, true) => -1e30,
                (9, true) => 3e38,
                (12, true) => -3e38,
                _ => base,
            }));
            // Three quarters zeros: q25 = q75 = 0.
            spiky.push(Some(if i % 4 == 0 { base * 100.0 - 300.0 } else { 0.0 }));
            holes.push(match i % 5 {
                0 => None,
                3 if offset > 0 => Some([f64::INFINITY, f64::NAN, 1e300][i % 3]),
                _ => Some(base - 5.0),
            });
        }
        vec![ColumnData::Float64(skewed), ColumnData::Float64(spiky), ColumnData::Float64(holes)]
    };
    let features: Vec<Feature> = ["skewed", "spiky", "holes"]
        .iter()
        .map(|n| Feature { name: n.to_string(), kind: FeatureKind::Numeric })
        .collect();
    let train_cols = cols(400, 0);
    let ColumnData::Float64(skewed) = &train_cols[0] else { unreachable!() };
    let target = ColumnData::Float64(skewed.iter().map(|v| Some(v.unwrap().clamp(-10.0, 20.0) * 2.0 + 1.0)).collect());
    let held_out = cols(300, 10_000);
    for options in [
        json!({"hidden": [], "numeric_encoding": "robust"}),
        json!({"hidden": [8, 4], "activation": "gelu", "encodings": {"skewed": "robust", "spiky": "robust", "holes": "robust"}}),
    ] {
        let mut options = TrainOptions::from_json(Some(&options)).unwrap();
        options.epochs = 5;
        let plan = TrainingPlan {
            task: Task::Regression,
            target: "y".into(),
            features: features.clone(),
            class_labels: vec![],
            options,
        };
        let model = train(&plan, &train_cols, &target, Compute::cpu(1), &mut |_| Control::Continue).unwrap();
        let encoders: Vec<&Encoder> = model.pipeline.features.iter().map(|f| &f.encoder).collect();
        assert!(matches!(encoders[0], Encoder::Robust { null_indicator: false, .. }), "{encoders:?}");
        let Encoder::Robust { median, scale, .. } = encoders[1] else { panic!("{encoders:?}") };
        assert_eq!(*median, 0.0);
        assert!(*scale > 100.0, "half the range, not the zero IQR: {scale}");
        assert!(matches!(encoders[2], Encoder::Robust { null_indicator: true, .. }), "{encoders:?}");
        assert_eq!(model.pipeline.width(), 4);

        let bytes = export(&model, &[]).unwrap();
        let onnx = ScoringModel::load(&rt, &bytes).unwrap();
        let engine = model.outputs(&held_out).unwrap();
        let (runtime, width) = onnx.run(&held_out).unwrap();
        assert_eq!((engine.len(), width), (runtime.len(), 1));
        for (i, (e, r)) in engine.iter().zip(&runtime).enumerate() {
            assert!(e.is_finite(), "row {i}: {e}");
            assert!((e - r).abs() <= 1e-5 * e.abs().max(1.0), "{:?} row {i}: engine {e} onnx {r}", plan.options);
        }
    }
}

/// A regression's target transform is undone inside the graph: ONNX Runtime
/// gives what the engine gives after inverting it (`exp` after `log`), in
/// the target's units; label smoothing changes training only.
#[test]
fn target_transforms_are_inverted_inside_the_graph() {
    let Some(rt) = common::onnx_runtime() else { return };
    for (transform, log) in [("log", true), ("standardize", false), ("none", false), ("auto", false)] {
        let options = json!({"hidden": [8], "target_transform": transform});
        let model = trained(Task::Regression, options.clone());
        let scale = model.target_scale.expect("a regression has a target scale");
        assert_eq!(scale.log, log, "{transform}");
        if transform == "log" {
            assert!(scale.mean > 4.0 && scale.mean < 5.0, "the network learnt ln y (y near 100): {scale:?}");
        }
        check_agreement(&rt, &model, &format!("regression {options}"));
        check_native(&rt, &model, &plan(Task::Regression, options.clone()).0.options, &format!("regression {options}"));
        if transform == "none" {
            continue; // five epochs from 0 do not reach 100 on the raw scale
        }
        // In the target's units: the targets are 3·x + 100 for x in [-5, 5].
        let values = model.outputs(&columns(300, 10_000)).unwrap();
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
        assert!((mean - 100.0).abs() < 20.0, "{transform}: mean score {mean}");
    }
    for task in [Task::Binary, Task::Multiclass] {
        let options = json!({"hidden": [8], "label_smoothing": 0.1});
        check_agreement(&rt, &trained(task, options.clone()), &format!("{task} {options}"));
    }
}

/// Every member of a fused stack exports on its own and scores as the engine
/// scores it.
#[test]
fn every_member_of_a_fused_stack_exports_on_its_own() {
    let Some(rt) = common::onnx_runtime() else { return };
    let options = json!({"hidden": [8], "residual_blocks": 1, "norm": "batch", "encodings": {"internet": 2}});
    let (base, target) = plan(Task::Binary, options);
    let plans: Vec<TrainingPlan> = [1e-3, 3e-3, 1e-2]
        .iter()
        .map(|&lr| {
            let mut p = base.clone();
            p.options.learning_rate = lr;
            p
        })
        .collect();
    let members = train_group(&plans, &columns(400, 0), &target, Compute::cpu(2), &mut |_, _| {})
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect::<Vec<_>>();
    assert_eq!(members.len(), 3);
    assert_ne!(members[0].network, members[2].network);
    for (m, model) in members.iter().enumerate() {
        check_agreement(&rt, model, &format!("stack member {m}"));
    }
}

#[test]
fn batches_of_the_wrong_shape_are_refused() {
    let Some(rt) = common::onnx_runtime() else { return };
    let onnx = ScoringModel::load(&rt, &export(&trained(Task::Binary, json!({})), &[]).unwrap()).unwrap();
    let mut cols = columns(4, 0);
    cols.pop();
    assert!(onnx.run(&cols).is_err());
    let mut swapped = columns(4, 0);
    swapped.swap(0, 1);
    assert!(onnx.run(&swapped).is_err());
    assert!(ScoringModel::load(&rt, b"not an onnx file").is_err());
}

/// A selection's ensemble, as cerebrod builds it: members of different
/// architectures and encodings, weighed on their validation rows, in one
/// graph whose output is the weighted sum of the engine's own outputs.
#[test]
fn an_ensemble_graph_is_the_weighted_average_of_its_members() {
    use cerebro_daemon::catalog::Artifact;
    use cerebro_daemon::ensemble::{build, Candidate};
    use cerebro_daemon::train::{validation_metrics, validation_rows};

    let Some(rt) = common::onnx_runtime() else { return };
    for task in [Task::Binary, Task::Multiclass, Task::Regression] {
        let options = [
            json!({"hidden": [8], "learning_rate": 0.01}),
            json!({"hidden": [16, 8], "numeric_encoding": "robust", "learning_rate": 0.003}),
            json!({"hidden": [4], "numeric_encoding": "periodic", "encodings": {"internet": 2}, "dropout": 0.1}),
        ];
        let train_cols = columns(400, 0);
        let mut members = Vec::new();
        let mut candidates = Vec::new();
        let mut plan0 = None;
        for (v, o) in options.iter().enumerate() {
            let model = trained(task, o.clone());
            let bytes = export(&model, &[]).unwrap();
            candidates.push(Candidate {
                version: v as i32 + 1,
                artifact: Artifact {
                    label: "model \"test\" version 1".into(),
                    sha256: String::new(),
                    bytes,
                    import_layout: None,
                    task,
                    native: None,
                    members: Vec::new(),
                },
            });
            members.push(model);
            plan0.get_or_insert_with(|| plan(task, o.clone()));
        }
        let (plan, target) = plan0.unwrap();
        let mut table = train_cols.clone();
        table.push(target.clone());

        // The rows cerebrod weighs on are the ones each member validated on.
        let (rows, targets) = validation_rows(&plan, &target).unwrap();
        let valid: Vec<ColumnData> = train_cols.iter().map(|c| c.take(&rows)).collect();
        for m in &members {
            let again = validation_metrics(task, plan.class_labels.len(), &m.outputs(&valid).unwrap(), &targets);
            for (k, v) in &m.metrics {
                assert!((v - again[k]).abs() < 1e-9, "{task:?} {k}: {v} then {}", again[k]);
            }
        }

        let built = build(&rt, &plan, &table, &candidates, &[("cerebro.model", "e".into())]).unwrap();
        let total: f64 = built.ensemble.members.iter().map(|m| m.weight).sum();
        assert!((total - 1.0).abs() < 1e-6, "{task:?}: weights sum to {total}");
        assert_eq!(built.ensemble.pool, 3);
        assert!(built.ensemble.rounds >= 1);

        // ONNX Runtime on the ensemble's file equals the weighted sum of the
        // engine's outputs on held-out rows (NULLs, unseen categories).
        let held_out = columns(300, 10_000);
        let graph = ScoringModel::load(&rt, &built.onnx).unwrap();
        let (scored, _) = graph.run(&held_out).unwrap();
        let mut expected = vec![0.0f32; scored.len()];
        for m in &built.ensemble.members {
            let out = members[m.version as usize - 1].outputs(&held_out).unwrap();
            for (e, o) in expected.iter_mut().zip(out) {
                *e += m.weight as f32 * o;
            }
        }
        for (i, (e, r)) in expected.iter().zip(&scored).enumerate() {
            assert!((e - r).abs() <= 1e-5 * e.abs().max(1.0), "{task:?} row {i}: engine {e} ensemble {r}");
        }
        // Its metrics are the weighted average's on the validation rows, and
        // greedy selection never ends worse than its best member there.
        let mut average = vec![0.0f32; targets.len() * if task == Task::Multiclass { 3 } else { 1 }];
        for m in &built.ensemble.members {
            for (a, o) in average.iter_mut().zip(members[m.version as usize - 1].outputs(&valid).unwrap()) {
                *a += m.weight as f32 * o;
            }
        }
        let metrics = validation_metrics(task, plan.class_labels.len(), &average, &targets);
        let key = if task == Task::Regression { "rmse" } else { "log_loss" };
        assert!((metrics[key] - built.metrics[key]).abs() < 1e-5, "{task:?}");
        let best = members.iter().map(|m| m.metrics[key]).fold(f64::INFINITY, f64::min);
        assert!(built.metrics[key] <= best + 1e-5, "{task:?}: ensemble {} best member {best}", built.metrics[key]);
        let meta = cerebro_shared::onnx_graph::read_signature(&built.onnx).unwrap();
        assert_eq!(meta.outputs.len(), 1);
    }
}

/// A selection's ensemble is explained by its members: each from one
/// baseline row, of the class the ensemble ranks first, weighted as its
/// graph weighs their outputs; the contributions add up to the ensemble's
/// own score, for every head, with members of three architectures and
/// encodings (the periodic one integrated without path cuts).
#[test]
fn an_ensemble_is_explained_by_its_members_completely() {
    let Some(rt) = common::onnx_runtime() else { return };
    let weights = [0.5, 0.3, 0.2];
    for task in [Task::Binary, Task::Multiclass, Task::Regression] {
        let options = [
            json!({"hidden": [8], "learning_rate": 0.01}),
            json!({"hidden": [16, 8], "numeric_encoding": "robust", "learning_rate": 0.003}),
            json!({"hidden": [4], "numeric_encoding": "periodic", "encodings": {"internet": 2}, "dropout": 0.1}),
        ];
        let (mut files, mut members) = (Vec::new(), Vec::new());
        for o in &options {
            let model = trained(task, o.clone());
            let bytes = export(&model, &[]).unwrap();
            let classes = model.class_labels.len();
            let parts =
                NativeParts { pipeline: model.pipeline.clone(), options: plan(task, o.clone()).0.options, classes };
            let artifact = Artifact {
                label: "model \"test\" version 1".into(),
                sha256: String::new(),
                bytes: bytes.clone(),
                import_layout: None,
                task,
                native: Some(parts),
                members: Vec::new(),
            };
            let member = ScoringModel::from_artifact(&rt, &artifact).unwrap();
            assert!(member.native(), "{task:?}: the engine runs each member");
            members.push(member);
            files.push(bytes);
        }
        let weighed: Vec<(&[u8], f32)> = files.iter().zip(weights).map(|(b, w)| (b.as_slice(), w as f32)).collect();
        let graph = ScoringModel::load(&rt, &cerebro_daemon::onnx::ensemble(&weighed, &[]).unwrap()).unwrap();
        let held_out = columns(300, 10_000);
        let refs: Vec<ColumnRef<'_>> = held_out.iter().map(ColumnData::as_ref).collect();
        let (out, width) = graph.run(&held_out).unwrap();
        let (scores, _) = graph.score(&held_out).unwrap();
        let weighted: Vec<(f64, &ScoringModel)> = weights.iter().copied().zip(&members).collect();
        let values = graph.explain_ensemble(&weighted, &refs, 3, &out, width).unwrap();
        assert_eq!(values.len(), scores.len() * 4, "{task:?}");
        for (r, (row, score)) in values.chunks_exact(4).zip(&scores).enumerate() {
            let total = row[0] + row[1..].iter().sum::<f64>();
            let scale = if task == Task::Regression { score.abs().max(1.0) } else { 1.0 };
            assert!((total - score).abs() <= 1e-3 * scale, "{task:?} row {r}: {row:?} adds up to {total}, not {score}");
        }
        // One member at full weight is explained as it explains itself
        // (its own baseline row is then the ensemble's).
        let alone =
            graph.explain_ensemble(&[(1.0, &members[0])], &refs, 3, &members[0].run(&held_out).unwrap().0, width);
        assert_eq!(alone.unwrap(), members[0].explain(&refs, 3).unwrap(), "{task:?}");
        assert!(
            graph.explain_ensemble(&weighted, &refs, 2, &out, width).is_err(),
            "{task:?}: every column is explained"
        );
    }
}
