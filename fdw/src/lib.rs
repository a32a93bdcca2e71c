//! The `cerebro` PostgreSQL extension: a thin adapter between SQL and cerebrod.
//!
//! - `cerebro.models` (INSERT to train, SELECT to watch) and
//!   `cerebro.predictions` (SELECT to score) are foreign tables of one FDW;
//! - the catalog they read and write is plain SQL in `sql/catalog.sql`;
//! - the backend never does device work: it reads rows and hands them to
//!   cerebrod over a local socket and shared memory.

use pgrx::prelude::*;

mod access;
mod admin;
mod catalog;
mod daemon_client;
mod error;
mod explanation;
mod fdw;
mod fetch;
mod foreign_scan;
mod gucs;
mod identity;
mod imports;
mod in_backend;
mod invalidation;
mod joins;
mod jsonb;
mod limits;
mod models;
mod plans;
mod predict;
mod predictions;
mod recommend;
mod sources;
mod training;

pgrx::pg_module_magic!();

// A fresh install runs the 0.1.0 catalog, then every upgrade script in
// order: the same SQL an upgraded database ran.
extension_sql_file!(
    "../../sql/catalog.sql",
    name = "catalog",
    requires = [fdw::__cerebro_fdw_pgrx::cerebro_fdw_handler, fdw::__cerebro_fdw_pgrx::cerebro_fdw_validator]
);
extension_sql_file!("../../sql/cerebro--0.1.0--0.2.0.sql", name = "upgrade_0_2_0", requires = ["catalog"], finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    gucs::init();
    keep_backtraces_in_the_server_log();
}

/// A panic in a backend becomes an ERROR (pgrx's hook, installed when the
/// library loads); pgrx puts a captured backtrace in that ERROR's DETAIL,
/// which goes to the client. Capture is switched off for pgrx, and this hook
/// writes the panic and its backtrace to the server log (the backend's
/// stderr) before pgrx's hook turns it into the ERROR.
fn keep_backtraces_in_the_server_log() {
    use std::io::Write;
    // Read once, at the first capture: none has happened yet in this backend.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    let to_error = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // pgrx raises every ERROR, Cerebro's and PostgreSQL's, as a panic
        // with one of these payloads: those are reports, not bugs.
        let payload = info.payload();
        let reported = payload.is::<pgrx::pg_sys::panic::ErrorReportWithLevel>()
            || payload.is::<pgrx::pg_sys::panic::CaughtError>();
        if !reported {
            let backtrace = std::backtrace::Backtrace::force_capture();
            // A failed write must not panic inside the hook: that aborts.
            let _ = writeln!(
                std::io::stderr().lock(),
                "cerebro: panic in backend {}: {info}\n{backtrace}",
                std::process::id()
            );
        }
        to_error(info)
    }));
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn setup() {
        Spi::run(
            "CREATE TABLE public.customers (id int PRIMARY KEY, age int, plan text, paid numeric, joined date, churn text);
             INSERT INTO public.customers
                 SELECT i, 20 + i % 50, (ARRAY['basic','plus','pro'])[1 + i % 3], (i % 7) * 10.5,
                        DATE '2024-01-01' + i, CASE WHEN i % 4 = 0 THEN 'yes' ELSE 'no' END
                 FROM generate_series(1, 200) i;
             CREATE TABLE public.empty_src (id int, x int, y text);
             CREATE TABLE public.one_class (id int, x int, y text);
             INSERT INTO public.one_class SELECT i, i, 'same' FROM generate_series(1, 10) i;",
        )
        .unwrap();
    }

    fn queued_jobs() -> i64 {
        Spi::get_one::<i64>("SELECT count(*) FROM cerebro.jobs WHERE state = 'queued'").unwrap().unwrap()
    }

    #[pg_test]
    fn create_extension_makes_the_catalog_and_foreign_tables() {
        for rel in [
            "cerebro.model_versions",
            "cerebro.jobs",
            "cerebro.snapshots",
            "cerebro.artifacts",
            "cerebro.training_history",
            "cerebro.deployments",
            "cerebro.deployment_history",
            "cerebro.audit_log",
            "cerebro.model_grants",
            "cerebro.models",
            "cerebro.predictions",
        ] {
            let found = Spi::get_one_with_args::<bool>("SELECT to_regclass($1) IS NOT NULL", &[rel.into()]).unwrap();
            assert_eq!(found, Some(true), "{rel}");
        }
        let socket = Spi::get_one::<String>(
            "SELECT option_value FROM pg_options_to_table((SELECT srvoptions FROM pg_foreign_server
             WHERE srvname = 'cerebro_daemon')) WHERE option_name = 'socket'",
        )
        .unwrap();
        assert!(socket.is_some());
    }

    /// The default selection of a multiclass target searches BatchNorm too,
    /// and says so in its plan; a binary target's searches the default as
    /// written.
    #[pg_test]
    fn the_default_selection_of_a_multiclass_target_searches_batchnorm() {
        setup();
        Spi::run("INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('tier', 'customers', 'plan', 'id', 'default')")
            .unwrap();
        let searched = Spi::get_one::<String>("SELECT plan->>'searched' FROM cerebro.selections WHERE name = 'tier'")
            .unwrap()
            .unwrap_or_default();
        assert!(searched.ends_with("model  norm = {none, batch}\ntrain  epochs = 80, patience = 16"), "{searched}");
        let norms = Spi::get_one::<Vec<String>>(
            "SELECT array_agg(DISTINCT options->>'norm' ORDER BY options->>'norm') FROM cerebro.model_versions
             WHERE name = 'tier'",
        )
        .unwrap();
        assert_eq!(norms, Some(vec!["batch".to_string(), "none".to_string()]));
        Spi::run("INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('churn', 'customers', 'churn', 'id', 'default')")
            .unwrap();
        let searched =
            Spi::get_one::<bool>("SELECT plan ? 'searched' FROM cerebro.selections WHERE name = 'churn'").unwrap();
        assert_eq!(searched, Some(false), "a binary target searches the default as written");
    }

    #[pg_test]
    fn the_default_validates_a_large_ordered_split_on_its_newest_rows() {
        setup();
        // 70,000 rows: a fifth would be 14,000, more than the 13,000 kept.
        Spi::run(
            "CREATE TABLE public.events AS
                 SELECT i AS id, (i * 7919 % 1000)::float8 AS x, CASE WHEN i % 3 = 0 THEN 'yes' ELSE 'no' END AS late
                 FROM generate_series(1, 70000) i",
        )
        .unwrap();
        let searched = |name: &str, options: &str| {
            Spi::run(&format!(
                "INSERT INTO cerebro.models (name, source, target, key, spec, options)
                 VALUES ('{name}', 'events', 'late', 'id', 'default', '{options}')"
            ))
            .unwrap();
            Spi::get_one::<String>(&format!("SELECT plan->>'searched' FROM cerebro.selections WHERE name = '{name}'"))
                .unwrap()
        };
        let ordered = searched("ordered", r#"{"split": "ordered"}"#).unwrap_or_default();
        assert!(ordered.ends_with("\ntrain  validation_fraction = 0.186"), "{ordered}");
        let share = Spi::get_one::<f64>(
            "SELECT (options->>'validation_fraction')::float8 FROM cerebro.model_versions
             WHERE name = 'ordered' AND version = 1",
        )
        .unwrap();
        assert_eq!(share, Some(0.186));
        assert_eq!(searched("random", "{}"), None, "a random split keeps its fifth");
        assert_eq!(
            searched("given", r#"{"split": "ordered", "validation_fraction": 0.3}"#),
            None,
            "the share the user gave"
        );
    }

    #[pg_test]
    fn the_default_encodes_a_repeated_integer_id_as_a_category() {
        setup();
        // Purchases: a household buys again and again (40 households over
        // 200 rows); `receipt_id`, the key, is unique to its row;
        // `store_code` is named as an identifier but holds one value (every
        // row one store); `visits` is a count.
        Spi::run(
            "CREATE TABLE public.purchases AS
                 SELECT i AS receipt_id, i % 40 AS household_id, 1 AS store_code, i % 9 AS visits,
                        (i * 7 % 40)::float8 AS price, CASE WHEN i % 40 < 15 THEN 'a' ELSE 'b' END AS brand
                 FROM generate_series(1, 200) i",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, key, spec)
             VALUES ('brand', 'purchases', 'brand', 'receipt_id', 'default')",
        )
        .unwrap();
        let searched = Spi::get_one::<String>("SELECT plan->>'searched' FROM cerebro.selections WHERE name = 'brand'")
            .unwrap()
            .unwrap_or_default();
        assert!(searched.ends_with("\nencode  household_id = category"), "{searched}");
        let kinds = Spi::get_one::<pgrx::JsonB>(
            "SELECT jsonb_object_agg(f->>'name', f->>'kind') FROM cerebro.model_versions,
                    jsonb_array_elements(features) f WHERE name = 'brand' AND version = 1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            kinds.0,
            serde_json::json!({"household_id": "categorical", "store_code": "numeric", "visits": "numeric",
                               "price": "numeric"})
        );
        // What a user writes does the same.
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, options)
             VALUES ('by_hand', 'purchases', 'brand', '{\"encodings\": {\"visits\": 4}}')",
        )
        .unwrap();
        let kind = Spi::get_one::<String>(
            "SELECT f->>'kind' FROM cerebro.model_versions, jsonb_array_elements(features) f
             WHERE name = 'by_hand' AND f->>'name' = 'visits'",
        )
        .unwrap();
        assert_eq!(kind.as_deref(), Some("categorical"));
    }

    #[pg_test]
    fn a_regressions_meta_counts_the_rows_it_trains_on() {
        // NaN, ±Infinity and a numeric past float8's range are not trained
        // on, nor is NULL: 600 rows, 595 of them finite.
        Spi::run(
            "CREATE TABLE public.prices (id int, x float8, price numeric);
             INSERT INTO public.prices SELECT i, i, i * 2.5 FROM generate_series(1, 600) i;
             UPDATE public.prices SET price = CASE id WHEN 1 THEN 'NaN' WHEN 2 THEN 'Infinity'
                 WHEN 3 THEN '-Infinity' WHEN 4 THEN 1e400 ELSE NULL END WHERE id <= 5;
             INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('price', 'prices', 'price', 'id', '{\"epochs\": 3}')",
        )
        .unwrap();
        let rows = Spi::get_one::<i64>("SELECT (meta->>'rows')::int8 FROM cerebro.snapshots").unwrap();
        assert_eq!(rows, Some(595));
    }

    #[pg_test]
    fn a_query_source_may_end_in_a_line_comment() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('commented', '(SELECT * FROM customers -- every customer
             )', 'churn', 'id', '{\"epochs\": 3}')",
        )
        .unwrap();
        assert_eq!(queued_jobs(), 1);
    }

    #[pg_test(
        error = "the source query cannot be used: a query source is one SELECT in parentheses with nothing after them: no alias, no semicolon"
    )]
    fn a_query_source_with_an_alias_says_so() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, key)
             VALUES ('aliased', '(SELECT * FROM customers) c', 'churn', 'id')",
        )
        .unwrap();
    }

    #[pg_test]
    fn a_valid_insert_freezes_a_snapshot_and_queues_a_job() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, key, options)
             VALUES ('churn', 'customers', 'churn', 'id', '{\"epochs\": 3}')",
        )
        .unwrap();
        assert_eq!(queued_jobs(), 1);
        let (status, task) = Spi::get_two::<String, String>(
            "SELECT status::text, task FROM cerebro.model_versions WHERE name = 'churn' AND version = 1",
        )
        .unwrap();
        assert_eq!((status.as_deref(), task.as_deref()), (Some("queued"), Some("binary")));
        let rows = Spi::get_one::<i64>("SELECT row_count FROM cerebro.snapshots").unwrap();
        assert_eq!(rows, Some(200));
        let data = Spi::get_one::<String>("SELECT data_relation FROM cerebro.snapshots").unwrap().unwrap();
        let copied = Spi::get_one::<i64>(&format!("SELECT count(*) FROM {data}")).unwrap();
        assert_eq!(copied, Some(200));
        // `joined` is a date: skipped from the default features, with a notice.
        let features = Spi::get_one::<pgrx::JsonB>("SELECT features FROM cerebro.model_versions").unwrap().unwrap();
        let names: Vec<&str> = features.0.as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(names, vec!["age", "plan", "paid"]);
        let labels = Spi::get_one::<Vec<String>>("SELECT class_labels FROM cerebro.model_versions").unwrap();
        assert_eq!(labels, Some(vec!["no".to_string(), "yes".to_string()]));

        // A second insert is version 2; the foreign table shows both.
        Spi::run("INSERT INTO cerebro.models (name, source, target, key) VALUES ('churn', 'customers', 'churn', 'id')")
            .unwrap();
        let listed =
            Spi::get_one::<i64>("SELECT count(*) FROM cerebro.models WHERE name = 'churn' AND status = 'queued'")
                .unwrap();
        assert_eq!(listed, Some(2));
        let progress = Spi::get_one::<String>("SELECT progress FROM cerebro.models WHERE version = 2").unwrap();
        assert_eq!(progress.as_deref(), Some("queued"));
    }

    #[pg_test(error = "relation \"no_such_table\" does not exist")]
    fn unknown_relation() {
        Spi::run("INSERT INTO cerebro.models (name, source, target) VALUES ('m', 'no_such_table', 'y')").unwrap();
    }

    #[pg_test(error = "column \"nope\" does not exist in public.customers")]
    fn unknown_target_column() {
        setup();
        Spi::run("INSERT INTO cerebro.models (name, source, target) VALUES ('m', 'customers', 'nope')").unwrap();
    }

    #[pg_test(error = "column \"joined\" of public.customers has type date, which Cerebro cannot use as a feature")]
    fn wrong_typed_feature() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, features)
             VALUES ('m', 'customers', 'churn', ARRAY['age', 'joined'])",
        )
        .unwrap();
    }

    #[pg_test(error = "public.empty_src has no rows with a non-NULL \"y\" to train on")]
    fn empty_source() {
        setup();
        Spi::run("INSERT INTO cerebro.models (name, source, target) VALUES ('m', 'empty_src', 'y')").unwrap();
    }

    #[pg_test(error = "target column \"y\" has 1 distinct non-NULL value(s); at least 2 are needed to learn anything")]
    fn single_class_label() {
        setup();
        Spi::run("INSERT INTO cerebro.models (name, source, target) VALUES ('m', 'one_class', 'y')").unwrap();
    }

    #[pg_test(error = "permission denied for table public.customers")]
    fn user_without_select_privilege() {
        setup();
        Spi::run("CREATE ROLE cerebro_test_nobody; SET ROLE cerebro_test_nobody;").unwrap();
        Spi::run("INSERT INTO cerebro.models (name, source, target) VALUES ('m', 'public.customers', 'churn')")
            .unwrap();
    }

    #[pg_test(error = "unknown option \"epoch\"")]
    fn unknown_option() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, options)
             VALUES ('m', 'customers', 'churn', '{\"epoch\": 3}')",
        )
        .unwrap();
    }

    #[pg_test(error = "option \"encodings\" names column \"agee\", which is not a feature of this model")]
    fn encoding_for_an_unknown_column() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, options)
             VALUES ('m', 'customers', 'churn', '{\"encodings\": {\"agee\": \"ple\"}}')",
        )
        .unwrap();
    }

    #[pg_test(error = "option \"encodings\" gives numeric column \"paid\" the categorical encoding \"category\"")]
    fn a_real_number_is_never_a_category() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, options)
             VALUES ('m', 'customers', 'churn', '{\"encodings\": {\"paid\": \"category\"}}')",
        )
        .unwrap();
    }

    #[pg_test(error = "option \"class_weights\" names label \"maybe\", which the target does not have")]
    fn class_weight_for_an_unknown_label() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, options)
             VALUES ('m', 'customers', 'churn', '{\"class_weights\": {\"maybe\": 2}}')",
        )
        .unwrap();
    }

    #[pg_test(error = "column \"status\" of cerebro.models is set by Cerebro and cannot be inserted")]
    fn read_only_columns() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, status) VALUES ('m', 'customers', 'churn', 'ready')",
        )
        .unwrap();
    }

    #[pg_test(error = "model \"ghost\" does not exist")]
    fn predictions_for_an_unknown_model() {
        Spi::run("SELECT * FROM cerebro.predictions WHERE model = 'ghost'").unwrap();
    }

    #[pg_test(error = "model \"churn\" version 1 is queued for training")]
    fn predictions_before_training() {
        setup();
        Spi::run("INSERT INTO cerebro.models (name, source, target, key) VALUES ('churn', 'customers', 'churn', 'id')")
            .unwrap();
        Spi::run("SELECT * FROM cerebro.predictions WHERE model = 'churn'").unwrap();
    }

    #[pg_test(error = "cerebro.predictions needs to know which model to score with")]
    fn predictions_without_a_model() {
        Spi::run("SELECT * FROM cerebro.predictions").unwrap();
    }

    #[pg_test(error = "model \"churn\" version 1 is queued for training")]
    fn predictions_of_a_list_of_one_model() {
        setup();
        Spi::run("INSERT INTO cerebro.models (name, source, target, key) VALUES ('churn', 'customers', 'churn', 'id')")
            .unwrap();
        Spi::run("SELECT * FROM cerebro.predictions WHERE model = ANY (ARRAY['churn', 'churn'])").unwrap();
    }

    #[pg_test(error = "cerebro.predictions scores one model a scan; this query names 2")]
    fn predictions_of_a_list_of_models() {
        Spi::run("SELECT * FROM cerebro.predictions WHERE model IN ('a', 'b')").unwrap();
    }

    /// A model with versions 1 (ready, as if trained) and 2 (queued).
    fn two_versions() {
        setup();
        for _ in 0..2 {
            Spi::run("INSERT INTO cerebro.models (name, source, target, key) VALUES ('m', 'customers', 'churn', 'id')")
                .unwrap();
        }
        Spi::run("UPDATE cerebro.model_versions SET status = 'ready' WHERE name = 'm' AND version = 1").unwrap();
    }

    #[pg_test]
    fn deploying_records_history_and_audit_and_marks_the_model() {
        two_versions();
        assert_eq!(Spi::get_one::<i32>("SELECT cerebro.deploy('m', 1, 'first')").unwrap(), Some(1));
        let deployed = Spi::get_one::<i32>("SELECT version FROM cerebro.models WHERE name = 'm' AND deployed").unwrap();
        assert_eq!(deployed, Some(1));
        let (action, comment) =
            Spi::get_two::<String, String>("SELECT action, comment FROM cerebro.deployment_history WHERE name = 'm'")
                .unwrap();
        assert_eq!((action.as_deref(), comment.as_deref()), (Some("deploy"), Some("first")));
        let actions = Spi::get_one::<Vec<String>>(
            "SELECT array_agg(action ORDER BY id) FROM cerebro.audit_log WHERE model = 'm'",
        )
        .unwrap();
        let expected: Vec<String> = ["create", "create", "deploy"].map(String::from).to_vec();
        assert_eq!(actions, Some(expected));
    }

    #[pg_test(error = "model \"m\" version 2 is queued; only a ready version can be deployed")]
    fn deploying_a_version_that_is_not_ready() {
        two_versions();
        Spi::run("SELECT cerebro.deploy('m', 2)").unwrap();
    }

    #[pg_test(error = "model \"m\" has no earlier deployment to roll back to")]
    fn rolling_back_past_the_first_deployment() {
        two_versions();
        Spi::run("SELECT cerebro.deploy('m', 1)").unwrap();
        Spi::run("SELECT cerebro.rollback('m')").unwrap();
    }

    #[pg_test(error = "version must not be NULL")]
    fn deploying_a_null_version() {
        two_versions();
        Spi::run("SELECT cerebro.deploy('m', NULL)").unwrap();
    }

    #[pg_test(error = "model \"m\" does not exist")]
    fn a_model_not_granted_does_not_exist_for_deploy() {
        two_versions();
        Spi::run("CREATE ROLE cerebro_test_other; SET ROLE cerebro_test_other").unwrap();
        Spi::run("SELECT cerebro.deploy('m', 1)").unwrap();
    }

    #[pg_test(error = "model \"m\" version 2 is queued; only a ready version can be exported")]
    fn exporting_a_version_that_is_not_ready() {
        two_versions();
        Spi::run("SELECT cerebro.export_onnx('m', 2)").unwrap();
    }

    fn count(query: &str) -> i64 {
        Spi::get_one::<i64>(query).unwrap().unwrap()
    }

    #[pg_test]
    fn a_role_sees_only_the_models_it_owns_or_was_granted() {
        two_versions();
        Spi::run("SELECT cerebro.deploy('m', 1)").unwrap();
        Spi::run("CREATE ROLE cerebro_test_analyst").unwrap();
        let visible = || {
            Spi::run("SET ROLE cerebro_test_analyst").unwrap();
            let seen = [
                count("SELECT count(*) FROM cerebro.models"),
                count("SELECT count(*) FROM cerebro.model_versions"),
                count("SELECT count(*) FROM cerebro.jobs"),
                count("SELECT count(*) FROM cerebro.snapshots"),
                count("SELECT count(*) FROM cerebro.deployments"),
                count("SELECT count(*) FROM cerebro.deployment_history"),
                count("SELECT count(*) FROM cerebro.audit_log"),
            ];
            Spi::run("RESET ROLE").unwrap();
            seen
        };
        assert_eq!(visible(), [0; 7]);
        Spi::run("SELECT cerebro.grant_model('m', 'cerebro_test_analyst')").unwrap();
        // Two versions (and their jobs and snapshots), one deployment, and the
        // audit rows: two creates, a deploy and the grant.
        assert_eq!(visible(), [2, 2, 2, 2, 1, 1, 4]);
        Spi::run("SELECT cerebro.revoke_model('m', 'cerebro_test_analyst')").unwrap();
        assert_eq!(visible(), [0; 7]);
        // Through a group role: members of a grantee see what it sees.
        Spi::run("CREATE ROLE cerebro_test_team; GRANT cerebro_test_team TO cerebro_test_analyst").unwrap();
        Spi::run("SELECT cerebro.grant_model('m', 'cerebro_test_team')").unwrap();
        assert_eq!(visible()[0], 2);
    }

    #[pg_test(error = "model \"m\" does not exist")]
    fn scoring_a_model_without_a_grant() {
        two_versions();
        Spi::run("CREATE ROLE cerebro_test_stranger; SET ROLE cerebro_test_stranger").unwrap();
        Spi::run("SELECT * FROM cerebro.predictions WHERE model = 'm'").unwrap();
    }

    #[pg_test(error = "permission denied to add a version to model \"m\"")]
    fn only_the_owner_adds_versions() {
        two_versions();
        Spi::run("CREATE ROLE cerebro_test_other2; GRANT SELECT ON customers TO cerebro_test_other2").unwrap();
        Spi::run("SELECT cerebro.grant_model('m', 'cerebro_test_other2'); SET ROLE cerebro_test_other2").unwrap();
        Spi::run("INSERT INTO cerebro.models (name, source, target) VALUES ('m', 'customers', 'churn')").unwrap();
    }

    #[pg_test]
    fn reproduce_queues_a_copy_on_the_same_snapshot() {
        two_versions();
        assert_eq!(Spi::get_one::<i32>("SELECT cerebro.reproduce('m', 1)").unwrap(), Some(3));
        let same = Spi::get_one::<bool>(
            "SELECT a.snapshot_id = b.snapshot_id AND a.options = b.options AND a.request = b.request
                    AND b.reproduces = 1 AND b.status = 'queued'
             FROM cerebro.model_versions a, cerebro.model_versions b
             WHERE a.name = 'm' AND a.version = 1 AND b.name = 'm' AND b.version = 3",
        )
        .unwrap();
        assert_eq!(same, Some(true));
        assert_eq!(queued_jobs(), 3);
    }

    #[pg_test(error = "model \"m\" has no version 9")]
    fn reproducing_a_version_that_does_not_exist() {
        two_versions();
        Spi::run("SELECT cerebro.reproduce('m', 9)").unwrap();
    }

    #[pg_test]
    fn delete_frees_bytes_but_keeps_lineage() {
        two_versions();
        let data_of = |v: i32| {
            Spi::get_one::<String>(&format!(
                "SELECT s.data_relation FROM cerebro.snapshots s JOIN cerebro.model_versions m ON m.snapshot_id = s.id
                 WHERE m.name = 'm' AND m.version = {v}"
            ))
            .unwrap()
            .unwrap()
        };
        let exists = |rel: &str| count(&format!("SELECT count(*) FROM pg_class WHERE oid = to_regclass('{rel}')")) == 1;
        let (data1, data2) = (data_of(1), data_of(2));
        // A queued version: its row, job and snapshot go.
        let freed = Spi::get_one::<i64>("SELECT cerebro.delete_model('m', 2)").unwrap().unwrap();
        assert!(freed > 0, "{freed}");
        assert!(!exists(&data2));
        assert_eq!(count("SELECT count(*) FROM cerebro.model_versions WHERE name = 'm'"), 1);
        assert_eq!(queued_jobs(), 1);
        // Version 3 reproduces version 1 on its snapshot: deleting 1 keeps its
        // row (the lineage) and the snapshot version 3 still needs.
        Spi::run("SELECT cerebro.reproduce('m', 1)").unwrap();
        Spi::run("SELECT cerebro.delete_model('m', 1)").unwrap();
        let status =
            Spi::get_one::<String>("SELECT status::text FROM cerebro.model_versions WHERE version = 1").unwrap();
        assert_eq!(status.as_deref(), Some("deleted"));
        assert!(exists(&data1));
        let audited = count("SELECT count(*) FROM cerebro.audit_log WHERE model = 'm' AND action = 'delete'");
        assert_eq!(audited, 2);
    }

    #[pg_test(error = "model \"m\" version 1 is deployed and cannot be deleted")]
    fn deleting_the_deployed_version() {
        two_versions();
        Spi::run("SELECT cerebro.deploy('m', 1)").unwrap();
        Spi::run("SELECT cerebro.delete_model('m', 1)").unwrap();
    }

    /// The model's last version may go though deployed, and its
    /// deployment with it; not while another version remains.
    #[pg_test]
    fn deleting_a_models_last_version_though_deployed() {
        two_versions();
        Spi::run("SELECT cerebro.deploy('m', 1)").unwrap();
        Spi::run("SELECT cerebro.delete_model('m', 2)").unwrap();
        Spi::run("SELECT cerebro.delete_model('m', 1)").unwrap();
        let left = Spi::get_one::<i64>(
            "SELECT (SELECT count(*) FROM cerebro.model_versions WHERE name = 'm')
                  + (SELECT count(*) FROM cerebro.deployments WHERE name = 'm')",
        )
        .unwrap();
        assert_eq!(left, Some(0));
    }

    #[pg_test(error = "model \"m\" version 1 is deleted")]
    fn scoring_a_deleted_version() {
        two_versions();
        Spi::run("SELECT cerebro.reproduce('m', 1); SELECT cerebro.delete_model('m', 1)").unwrap();
        Spi::run("SELECT * FROM cerebro.predictions WHERE model = 'm' AND version = 1").unwrap();
    }

    #[pg_test]
    fn archive_searches_by_relation_metric_layers_column() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, features, options) VALUES
                 ('deep', 'customers', 'churn', ARRAY['age', 'plan'], '{\"hidden\": [16, 8], \"residual_blocks\": 1}'),
                 ('wide', 'customers', 'churn', ARRAY['paid'], '{\"hidden\": [64]}');
             UPDATE cerebro.model_versions SET status = 'ready', metrics = '{\"auc\": 0.85, \"accuracy\": 0.8}'
                 WHERE name = 'deep';
             UPDATE cerebro.model_versions SET status = 'ready', metrics = '{\"auc\": 0.75}' WHERE name = 'wide';",
        )
        .unwrap();
        let (layers, widths) =
            Spi::get_two::<i32, Vec<i32>>("SELECT layers, widths FROM cerebro.archive WHERE name = 'deep'").unwrap();
        assert_eq!((layers, widths), (Some(3), Some(vec![16, 8, 8])));
        let found = Spi::get_one::<Vec<String>>(
            "SELECT array_agg(name) FROM cerebro.archive
             WHERE source_relation = 'public.customers' AND auc > 0.8 AND layers < 4",
        )
        .unwrap();
        assert_eq!(found, Some(vec!["deep".to_string()]));
        let by_column = Spi::get_one::<Vec<String>>(
            "SELECT array_agg(DISTINCT m.name) FROM cerebro.model_features f
             JOIN cerebro.model_versions m ON m.id = f.model_version_id WHERE f.column_name = 'paid'",
        )
        .unwrap();
        assert_eq!(by_column, Some(vec!["wide".to_string()]));
        // Importance, as cerebrod writes it, indexed by column and rank.
        Spi::run(
            "UPDATE cerebro.model_versions SET importance =
                 '{\"metric\": \"auc\", \"baseline\": 0.85, \"rows\": 100, \"repeats\": 3, \"columns\": [
                    {\"column\": \"plan\", \"importance\": 0.75, \"drop\": 0.09},
                    {\"column\": \"age\", \"importance\": 0.25, \"drop\": 0.03}]}'
             WHERE name = 'deep'",
        )
        .unwrap();
        let top = Spi::get_one::<Vec<String>>("SELECT top_columns FROM cerebro.archive WHERE name = 'deep'").unwrap();
        assert_eq!(top, Some(vec!["plan".to_string(), "age".to_string()]));
        let among_top = Spi::get_one::<Vec<String>>(
            "SELECT array_agg(a.name) FROM cerebro.archive a
             WHERE a.source_relation = 'public.customers' AND EXISTS (SELECT 1 FROM cerebro.model_importance i
                   WHERE i.model_version_id = a.model_version_id AND i.column_name = 'age' AND i.rank <= 3)",
        )
        .unwrap();
        assert_eq!(among_top, Some(vec!["deep".to_string()]));
        let (drop, share) = Spi::get_two::<f64, f64>(
            "SELECT metric_drop, importance FROM cerebro.model_importance WHERE column_name = 'plan' AND rank = 1",
        )
        .unwrap();
        assert_eq!((drop, share), (Some(0.09), Some(0.75)));
        // The searches are answered from indexes.
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        for (query, index) in [
            ("SELECT * FROM cerebro.model_metrics WHERE metric = 'auc' AND value > 0.8", "model_metrics_by_value"),
            ("SELECT * FROM cerebro.model_features WHERE column_name = 'paid'", "model_features_by_column"),
            (
                "SELECT * FROM cerebro.model_importance WHERE column_name = 'age' AND rank <= 3",
                "model_importance_by_column",
            ),
            (
                "SELECT * FROM cerebro.model_versions WHERE source_relation = 'public.customers'",
                "model_versions_by_source",
            ),
        ] {
            let plan: Vec<String> = Spi::connect(|c| {
                c.select(&format!("EXPLAIN (COSTS OFF) {query}"), None, &[])
                    .unwrap()
                    .map(|r| r.get::<String>(1).unwrap().unwrap_or_default())
                    .collect()
            });
            let text = plan.join(" ");
            assert!(text.contains(index), "{query}: {text}");
        }
    }

    #[pg_test]
    fn a_selection_queues_every_candidate_and_ranks_them() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, key, spec) VALUES ('sel', 'customers', 'churn', 'id',
                 'features age, plan, paid?
                  model hidden = {[8], [16, 8]}
                  train lr = {0.01, 0.001}, epochs = 2')",
        )
        .unwrap();
        assert_eq!(
            count("SELECT count(*) FROM cerebro.model_versions WHERE name = 'sel' AND selection_id IS NOT NULL"),
            8
        );
        assert_eq!(count("SELECT count(*) FROM cerebro.leaderboard WHERE name = 'sel'"), 8);
        assert_eq!(count("SELECT candidates FROM cerebro.selections WHERE name = 'sel'"), 8);
        let distinct = count(
            "SELECT count(DISTINCT (features::text, options->'hidden', options->'learning_rate'))
             FROM cerebro.model_versions WHERE name = 'sel'",
        );
        assert_eq!(distinct, 8);
        assert_eq!(
            count(
                "SELECT count(*) FROM cerebro.model_versions WHERE name = 'sel' AND jsonb_array_length(features) = 2"
            ),
            4
        );
        // Once trained, the leaderboard ranks by the validation metric.
        Spi::run(
            "UPDATE cerebro.model_versions SET status = 'ready', metrics = jsonb_build_object('auc', version / 10.0)
             WHERE name = 'sel'",
        )
        .unwrap();
        assert_eq!(
            Spi::get_one::<i32>("SELECT version FROM cerebro.leaderboard WHERE name = 'sel' AND rank = 1").unwrap(),
            Some(8)
        );
        // Its row goes with the last of its versions, not before.
        for version in 1..=8 {
            assert_eq!(count("SELECT count(*) FROM cerebro.selections WHERE name = 'sel'"), 1, "before {version}");
            Spi::run(&format!("SELECT cerebro.delete_model('sel', {version})")).unwrap();
        }
        assert_eq!(count("SELECT count(*) FROM cerebro.selections WHERE name = 'sel'"), 0);
    }

    #[pg_test]
    fn cancelling_a_selection_cancels_its_queued_candidates() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, spec)
             VALUES ('c', 'customers', 'churn', 'train lr = {0.01, 0.001, 0.0001}')",
        )
        .unwrap();
        Spi::run("UPDATE cerebro.model_versions SET status = 'ready' WHERE name = 'c' AND version = 1").unwrap();
        Spi::run("UPDATE cerebro.jobs SET state = 'done' WHERE model_version_id = (SELECT id FROM cerebro.model_versions WHERE name = 'c' AND version = 1)").unwrap();
        let selection = count("SELECT id FROM cerebro.selections WHERE name = 'c'");
        assert_eq!(Spi::get_one::<i32>(&format!("SELECT cerebro.cancel_selection({selection})")).unwrap(), Some(2));
        let statuses = Spi::get_one::<Vec<String>>(
            "SELECT array_agg(status::text ORDER BY version) FROM cerebro.model_versions WHERE name = 'c'",
        )
        .unwrap();
        let expected: Vec<String> = ["ready", "cancelled", "cancelled"].map(String::from).to_vec();
        assert_eq!(statuses, Some(expected), "finished candidates are kept");
        assert_eq!(queued_jobs(), 0);
    }

    #[pg_test(error = "selection 999 does not exist")]
    fn cancelling_an_unknown_selection() {
        Spi::run("SELECT cerebro.cancel_selection(999)").unwrap();
    }

    #[pg_test(error = "invalid selection spec: expected \"=\" after \"lr\", found \"0.1\"")]
    fn a_spec_that_does_not_parse() {
        setup();
        Spi::run("INSERT INTO cerebro.models (name, source, target, spec) VALUES ('s', 'customers', 'churn', 'train lr 0.1')")
            .unwrap();
    }

    #[pg_test(error = "this selection expands to 8 candidates, more than cerebro.max_candidates (4)")]
    fn a_spec_with_too_many_candidates() {
        setup();
        Spi::run("SET cerebro.max_candidates = 4").unwrap();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, spec)
             VALUES ('s', 'customers', 'churn', 'model hidden = {[8], [16]}, dropout = {0, 0.1, 0.2, 0.3}')",
        )
        .unwrap();
    }

    #[pg_test(error = "invalid selection spec: option \"dropout\" is 1.5, allowed: at least 0 and below 0.95")]
    fn a_spec_with_a_value_out_of_range() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, spec) VALUES ('s', 'customers', 'churn', 'model dropout = {0.1, 1.5}')",
        )
        .unwrap();
    }

    #[pg_test(error = "role \"nobody_here\" does not exist")]
    fn granting_to_an_unknown_role() {
        two_versions();
        Spi::run("SELECT cerebro.grant_model('m', 'nobody_here')").unwrap();
    }

    /// An explanation made as jsonb directly is, byte for byte, the jsonb
    /// `jsonb_in` makes of its JSON text: every kind of value, text beyond
    /// ASCII, a class, numbers that are not finite or need the long numeric
    /// format, no column listed, and more than 32 (where jsonb records an
    /// offset among the lengths).
    #[pg_test]
    fn an_explanation_made_as_jsonb_is_its_json_text_read_as_jsonb() {
        use cerebro_shared::explanation::{explain_row, write_ascii_json, Shown};
        let mut columns: Vec<String> =
            ["tenure", "contract", "charges", "paperless", "crédit"].map(String::from).to_vec();
        let mut values = vec![
            Shown::Number(1.0),
            Shown::Text("Month-to-month – 𝔸 \"quoted\"".into()),
            Shown::Null,
            Shown::Number(f64::NAN),
            Shown::Number(0.1 + 0.2),
        ];
        let mut contributions = vec![0.2521993173286319, -0.1115498710423708, 1e-300, f64::INFINITY, -3.5e12];
        for i in 0..40 {
            columns.push(format!("c{i}"));
            values.push(Shown::Number(-1.7976931348623157e308 / f64::from(i + 1)));
            contributions.push(f64::from(i) * 1e-5 - 2e-4);
        }
        let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
        let bytes = |datum: pg_sys::Datum| {
            let pointer = datum.cast_mut_ptr::<pg_sys::varlena>();
            // SAFETY: a jsonb datum just made, not toasted.
            unsafe { std::slice::from_raw_parts(pointer.cast::<u8>(), pgrx::varsize_any(pointer)) }.to_vec()
        };
        let mut scratch = Vec::new();
        for (class, top_k, baseline) in
            [(None, 5, 0.344), (Some("Ünïcode"), 2, f64::NAN), (None, 0, -1.0), (None, 45, 0.0)]
        {
            let mut order = Vec::new();
            let e = explain_row(&columns, |c| values[c].clone(), baseline, &contributions, class, top_k, &mut order);
            let mut text = Vec::new();
            write_ascii_json(&e, &mut text);
            let text = std::ffi::CString::new(text).unwrap();
            let made = crate::explanation::explanation_jsonb(&e, &mut scratch).unwrap();
            // SAFETY: jsonb's input function on a NUL-terminated string.
            let read = unsafe {
                pg_sys::OidInputFunctionCall(
                    pg_sys::Oid::from(pg_sys::F_JSONB_IN),
                    text.as_ptr().cast_mut(),
                    pg_sys::JSONBOID,
                    -1,
                )
            };
            assert_eq!(bytes(made), bytes(read), "{text:?}");
        }
    }

    #[pg_test]
    fn numbers_read_as_stored_equal_their_float8_casts_bit_for_bit() {
        use cerebro_shared::batch::PackedColumn;
        // Numerics of every length, scale and sign, both storage formats
        // (short below a weight of 64 and a scale of 64, long beyond), the
        // special values, and each integer and float type.
        Spi::run(
            "CREATE TABLE public.numbers AS
             SELECT (pg_catalog.random() - 0.5) * 10 ^ (i % 40 - 20) AS f,
                    pg_catalog.round(((pg_catalog.random() - 0.5) * 10 ^ (i % 30 - 8))::numeric, i % 25) AS n,
                    (i * 7919 % 65536 - 32768)::int2 AS s, i * 104729 AS i4, i::int8 * 1000000007 * 1000000 AS i8
             FROM pg_catalog.generate_series(1, 5000) i
             UNION ALL SELECT 0.1, x, 0::int2, 0, 0
             FROM pg_catalog.unnest(ARRAY['0', '-0.0', '0.1', '29.85', '-1990.50', '1e-130', '9.999999999999999e307',
                 '123456789012345678901234567890.123456789', 'NaN', 'Infinity', '-Infinity',
                 '0.000000000000000000000000000000000000000001']::numeric[]) x
             UNION ALL SELECT NULL, NULL, NULL, NULL, NULL",
        )
        .unwrap();
        let casts = "SELECT n, n::float8, i4, i4::float8, i8, i8::float8, s, s::float8, f::float4, f::float4::float8
                     FROM public.numbers";
        let rows = Spi::get_one::<i64>("SELECT count(*) FROM public.numbers").unwrap().unwrap();
        let read = Spi::connect(|client| {
            let cursor = client.open_cursor(casts, &[]).detach_into_name();
            crate::fetch::fetch_into(&cursor, rows + 1, (0..10).map(|_| PackedColumn::float64(0)).collect(), 0).unwrap()
        });
        let values = |c: &PackedColumn| match c {
            PackedColumn::Float64 { values, validity } => {
                (0..values.len()).map(|i| (validity[i / 8] >> (i % 8) & 1 == 1).then(|| values[i])).collect::<Vec<_>>()
            }
            PackedColumn::Text { .. } => unreachable!(),
        };
        for pair in read.chunks(2) {
            let (stored, cast) = (values(&pair[0]), values(&pair[1]));
            assert_eq!(stored.len() as i64, rows);
            for (s, c) in stored.iter().zip(&cast) {
                assert_eq!(s.map(f64::to_bits), c.map(f64::to_bits), "read {s:?}, cast {c:?}");
            }
        }
    }

    #[pg_test]
    fn a_snapshot_keeps_built_in_types_under_neutral_names() {
        setup();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, key, features)
             VALUES ('m', 'customers', 'churn', 'id', ARRAY['age', 'plan', 'paid'])",
        )
        .unwrap();
        let columns = Spi::get_one::<Vec<String>>("SELECT columns FROM cerebro.snapshots").unwrap();
        let expected: Vec<String> = ["churn", "id", "age", "plan", "paid"].map(String::from).to_vec();
        assert_eq!(columns, Some(expected));
        let described = Spi::get_one::<String>(
            "SELECT string_agg(a.attname || ' ' || format_type(a.atttypid, a.atttypmod), ', ' ORDER BY a.attnum)
             FROM pg_attribute a JOIN cerebro.snapshots s ON a.attrelid = to_regclass(s.data_relation)
             WHERE a.attnum > 0",
        )
        .unwrap();
        assert_eq!(described.as_deref(), Some("c1 text, c2 integer, c3 integer, c4 text, c5 numeric"));
        assert_eq!(
            Spi::get_one::<String>("SELECT source_relation FROM cerebro.model_versions").unwrap().as_deref(),
            Some("public.customers")
        );
    }

    #[pg_test]
    fn an_enum_target_is_frozen_as_text_without_its_owners_cast() {
        setup();
        Spi::run(
            "CREATE TYPE public.tier AS ENUM ('low', 'high');
             CREATE DOMAIN public.tier_d AS public.tier;
             CREATE FUNCTION public.tier_spy(public.tier) RETURNS text LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'the cast ran as %', current_user; END $$;
             CREATE CAST (public.tier AS text) WITH FUNCTION public.tier_spy(public.tier);
             CREATE TABLE public.tiers AS
                 SELECT i AS id, i % 5 AS x, (CASE WHEN i % 3 = 0 THEN 'high' ELSE 'low' END)::public.tier_d AS t
                 FROM generate_series(1, 60) i;",
        )
        .unwrap();
        Spi::run("INSERT INTO cerebro.models (name, source, target, key) VALUES ('e', 'tiers', 't', 'id')").unwrap();
        let labels = Spi::get_one::<Vec<String>>("SELECT class_labels FROM cerebro.model_versions").unwrap();
        assert_eq!(labels, Some(vec!["high".to_string(), "low".to_string()]));
    }

    #[pg_test]
    fn a_function_in_the_search_path_never_runs_as_the_owner() {
        setup();
        Spi::run(
            "CREATE ROLE cerebro_test_mallory; GRANT SELECT ON customers TO cerebro_test_mallory;
             CREATE SCHEMA mallory AUTHORIZATION cerebro_test_mallory;
             SET ROLE cerebro_test_mallory;
             CREATE FUNCTION mallory.nextval(text) RETURNS bigint LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'nextval hijacked as %', current_user; END $$;
             CREATE FUNCTION mallory.text_eq(text, text) RETURNS boolean LANGUAGE plpgsql AS
                 $$ BEGIN IF current_user <> 'cerebro_test_mallory' THEN
                        RAISE EXCEPTION '= hijacked as %', current_user; END IF;
                    RETURN $1 OPERATOR(pg_catalog.=) $2; END $$;
             CREATE OPERATOR mallory.= (LEFTARG = text, RIGHTARG = text, FUNCTION = mallory.text_eq);
             CREATE FUNCTION mallory.count(anyelement) RETURNS bigint LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'count hijacked as %', current_user; END $$;
             SET search_path = mallory, public;",
        )
        .unwrap();
        Spi::run(
            "INSERT INTO cerebro.models (name, source, target, key) VALUES ('mine', 'customers', 'churn', 'id');
             SELECT count(*) FROM cerebro.models;",
        )
        .unwrap();
        Spi::run("RESET ROLE; RESET search_path").unwrap();
        assert_eq!(count("SELECT count(*) FROM cerebro.model_versions WHERE name = 'mine'"), 1);
    }

    #[pg_test(error = "cerebro.may_use answers only about your own role and roles whose privileges you have")]
    fn may_use_does_not_answer_about_other_roles() {
        two_versions();
        Spi::run("CREATE ROLE cerebro_test_prober; SET ROLE cerebro_test_prober").unwrap();
        assert_eq!(Spi::get_one::<bool>("SELECT cerebro.may_use('m', 'cerebro_test_prober')").unwrap(), Some(false));
        Spi::run("SELECT cerebro.may_use('m', 'postgres')").unwrap();
    }

    #[pg_test(error = "permission denied for function finish_selection")]
    fn finish_selection_is_not_for_users() {
        Spi::run("CREATE ROLE cerebro_test_holder; SET ROLE cerebro_test_holder").unwrap();
        Spi::run("SELECT cerebro.finish_selection(1)").unwrap();
    }

    #[pg_test(error = "UPDATE on cerebro.models is not supported")]
    fn models_are_immutable() {
        setup();
        Spi::run("INSERT INTO cerebro.models (name, source, target) VALUES ('m', 'customers', 'churn')").unwrap();
        Spi::run("UPDATE cerebro.models SET target = 'age' WHERE name = 'm'").unwrap();
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
