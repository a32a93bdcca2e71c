-- Cerebro 0.1.0 -> 0.2.0: deployments with rollback and their history, the
-- audit log, ONNX export, access control on the catalog, provenance and
-- reproduction, retention, a searchable archive, and a catalog that pg_dump
-- keeps.
--
-- This file is both the upgrade script and, after catalog.sql, part of every
-- fresh install of 0.2.0, so the two paths cannot drift apart. Released
-- upgrade scripts are never edited; later changes go into new ones.

-- Tables created by an extension are left out of pg_dump unless marked: the
-- catalog is data (every model ever trained), so backups must carry it.
SELECT pg_catalog.pg_extension_config_dump('cerebro.snapshots', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.snapshots_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.model_versions', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.model_versions_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.jobs', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.jobs_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.artifacts', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.training_history', '');

-- The version of each model that cerebro.predictions scores with when a
-- query names none. `earlier` is the stack rollback pops: the versions
-- deployed before, the most recent last.
CREATE TABLE cerebro.deployments (
    name        text        PRIMARY KEY,
    version     integer     NOT NULL,
    earlier     integer[]   NOT NULL DEFAULT '{}',
    deployed_at timestamptz NOT NULL DEFAULT now(),
    deployed_by name        NOT NULL
);

ALTER FOREIGN TABLE cerebro.models ADD COLUMN deployed boolean;

-- Provenance. `request`: the INSERT as written (options before defaults);
-- `trained_with`: the daemon's version, the git commit it was built from,
-- the device and threads; `weights_sha256`: the trained parameters, so that
-- two trainings can be compared bit for bit; `reproduces`: the version a
-- cerebro.reproduce() call retrained.
ALTER TABLE cerebro.model_versions
    ADD COLUMN request        jsonb,
    ADD COLUMN trained_with   jsonb,
    ADD COLUMN weights_sha256 text,
    ADD COLUMN reproduces     integer;

-- Lineage (filled by derived models) and retention. A deleted version that
-- another version descends from keeps its row, status 'deleted', without its
-- bytes (artifact, snapshot data); `artifact_bytes` is what its ONNX file took.
ALTER TYPE cerebro.model_status ADD VALUE 'deleted';
ALTER TABLE cerebro.model_versions
    ADD COLUMN parent_version integer,
    ADD COLUMN change         text,
    ADD COLUMN artifact_bytes bigint,
    ADD COLUMN deleted_at     timestamptz;
UPDATE cerebro.model_versions m SET artifact_bytes = a.size_bytes
FROM cerebro.artifacts a WHERE a.model_version_id = m.id;
ALTER FOREIGN TABLE cerebro.models ADD COLUMN storage_bytes bigint;

-- Models trained elsewhere and imported as ONNX: no snapshot, no target;
-- `import_layout` says which columns feed which graph input and which
-- output is scored (cerebro_shared::onnx_graph::ImportLayout).
ALTER TABLE cerebro.model_versions
    ALTER COLUMN snapshot_id DROP NOT NULL,
    ALTER COLUMN target_column DROP NOT NULL,
    ADD COLUMN import_layout jsonb;

-- Every deployment change: who, when, from which version to which, and why.
CREATE TABLE cerebro.deployment_history (
    id           bigserial   PRIMARY KEY,
    name         text        NOT NULL,
    action       text        NOT NULL CHECK (action IN ('deploy', 'rollback')),
    from_version integer,                -- NULL: nothing was deployed
    to_version   integer     NOT NULL,
    comment      text,
    changed_by   name        NOT NULL,
    changed_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX deployment_history_by_model ON cerebro.deployment_history (name, id);

-- Who did what to which model, and when. Written by the extension's code,
-- not by triggers, so that restoring a dump does not write it twice.
CREATE TABLE cerebro.audit_log (
    id        bigserial   PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    role_name name        NOT NULL,
    action    text        NOT NULL
              CHECK (action IN ('create', 'deploy', 'rollback', 'delete', 'export', 'grant', 'revoke', 'cancel',
                                'distill', 'measure')),
    model     text        NOT NULL,
    version   integer,
    detail    jsonb
);
CREATE INDEX audit_log_by_model ON cerebro.audit_log (model, id);

SELECT pg_catalog.pg_extension_config_dump('cerebro.deployments', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.deployment_history', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.deployment_history_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.audit_log_id_seq', '');

-- Model selections: one INSERT with a `spec` (docs/selection.md) queues
-- every candidate as a version of the model; the leaderboard ranks them.
CREATE TABLE cerebro.selections (
    id         bigserial   PRIMARY KEY,
    name       text        NOT NULL,
    spec       text        NOT NULL,
    candidates integer     NOT NULL,
    created_by name        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    -- How cerebrod runs the candidates (strategy, halving rungs, budget,
    -- promote): shared/src/mst.rs SelectionPlan.
    plan       jsonb       NOT NULL DEFAULT '{"strategy": "grid"}',
    -- Set by cerebro.finish_selection once no candidate is left to train.
    finished_at timestamptz,
    promoted_version integer,
    -- The spec's budget, and what its candidates have spent of it: seconds
    -- since the INSERT and epochs summed over the candidates, brought up to
    -- date by cerebro.finish_selection after each stack cerebrod trains.
    budget_seconds double precision GENERATED ALWAYS AS ((plan->>'budget_seconds')::double precision) STORED,
    budget_epochs bigint GENERATED ALWAYS AS ((plan->>'budget_epochs')::bigint) STORED,
    spent_seconds double precision NOT NULL DEFAULT 0,
    spent_epochs bigint NOT NULL DEFAULT 0,
    -- Stacks whose snapshot cerebrod took from its memory rather than read
    -- again (snapshot_cache_mib, docs/operations.md), and the bytes of them.
    snapshot_cache_hits integer NOT NULL DEFAULT 0,
    snapshot_cache_bytes bigint NOT NULL DEFAULT 0
);
ALTER TABLE cerebro.model_versions ADD COLUMN selection_id bigint REFERENCES cerebro.selections (id);
CREATE INDEX model_versions_by_selection ON cerebro.model_versions (selection_id) WHERE selection_id IS NOT NULL;
-- Cancelling: queued candidates are cancelled at once; running ones are
-- asked to stop (cerebrod checks after each epoch) and end 'cancelled'.
ALTER TYPE cerebro.model_status ADD VALUE 'cancelled';
ALTER TYPE cerebro.job_state ADD VALUE 'cancelled';
ALTER TABLE cerebro.jobs ADD COLUMN cancel_requested boolean NOT NULL DEFAULT false;
ALTER FOREIGN TABLE cerebro.models ADD COLUMN spec text;
-- Derived models: INSERT with parent_version and a change (docs/selection.md).
ALTER FOREIGN TABLE cerebro.models ADD COLUMN parent_version integer, ADD COLUMN change text;
SELECT pg_catalog.pg_extension_config_dump('cerebro.selections', '');
SELECT pg_catalog.pg_extension_config_dump('cerebro.selections_id_seq', '');

-- The searchable archive: what people search models by, one row per fact,
-- indexed. Derived from cerebro.model_versions by a trigger (so not dumped:
-- a restore rebuilds them as it loads the versions).
CREATE TABLE cerebro.model_features (
    model_version_id bigint NOT NULL REFERENCES cerebro.model_versions (id) ON DELETE CASCADE,
    column_name      text   NOT NULL,
    kind             text   NOT NULL,  -- numeric or categorical
    PRIMARY KEY (model_version_id, column_name)
);
CREATE INDEX model_features_by_column ON cerebro.model_features (column_name);

-- Hidden layers in order: `dense` (hidden) then `residual` blocks; width NULL
-- when it depends on the data (a residual block without dense layers before it).
CREATE TABLE cerebro.model_layers (
    model_version_id bigint  NOT NULL REFERENCES cerebro.model_versions (id) ON DELETE CASCADE,
    position         integer NOT NULL,
    kind             text    NOT NULL CHECK (kind IN ('dense', 'residual')),
    width            integer,
    PRIMARY KEY (model_version_id, position)
);
CREATE INDEX model_layers_by_width ON cerebro.model_layers (width);

CREATE TABLE cerebro.model_metrics (
    model_version_id bigint           NOT NULL REFERENCES cerebro.model_versions (id) ON DELETE CASCADE,
    metric           text             NOT NULL,
    value            double precision NOT NULL,
    PRIMARY KEY (model_version_id, metric)
);
CREATE INDEX model_metrics_by_value ON cerebro.model_metrics (metric, value);

-- Global importance (issue 16): how much the version's validation metric
-- drops when one source column is shuffled among the validation rows,
-- measured by cerebrod after training (cerebro_shared::importance::Importance:
-- metric, baseline, rows, repeats and the columns, most important first).
-- `importance` is each column's share of the drops, summing to 1.
ALTER TABLE cerebro.model_versions ADD COLUMN importance jsonb;
ALTER FOREIGN TABLE cerebro.models ADD COLUMN top_columns text[];
CREATE TABLE cerebro.model_importance (
    model_version_id bigint           NOT NULL REFERENCES cerebro.model_versions (id) ON DELETE CASCADE,
    column_name      text             NOT NULL,
    rank             integer          NOT NULL,
    importance       double precision NOT NULL,
    metric_drop      double precision NOT NULL,
    PRIMARY KEY (model_version_id, rank)
);
CREATE INDEX model_importance_by_column ON cerebro.model_importance (column_name, rank);

-- Rule surrogate (issue 16): a decision tree of depth 4 fitted by cerebrod
-- to the version's own predictions on its training rows, with its fidelity
-- on the validation rows (cerebro_shared::surrogate::Surrogate). Read as
-- rules or as SQL with the functions below.
ALTER TABLE cerebro.model_versions ADD COLUMN surrogate jsonb;
CREATE INDEX model_versions_by_source ON cerebro.model_versions (source_relation);

-- SECURITY DEFINER: whoever writes a version (the extension owner, the
-- daemon's role) need not be able to write the derived tables. Nobody may
-- attach it to a table of their own (EXECUTE is revoked; the trigger below
-- fires whatever the writer's privileges): NEW would then carry the user's
-- types, and their casts would run as the function's owner.
CREATE FUNCTION cerebro.index_model_version() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_RELID OPERATOR(pg_catalog.<>) 'cerebro.model_versions'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'cerebro.index_model_version() indexes cerebro.model_versions only';
    END IF;
    DELETE FROM cerebro.model_features WHERE model_version_id = NEW.id;
    DELETE FROM cerebro.model_layers WHERE model_version_id = NEW.id;
    DELETE FROM cerebro.model_metrics WHERE model_version_id = NEW.id;
    DELETE FROM cerebro.model_importance WHERE model_version_id = NEW.id;
    INSERT INTO cerebro.model_features (model_version_id, column_name, kind)
    SELECT NEW.id, f->>'name', f->>'kind' FROM jsonb_array_elements(NEW.features) f;
    INSERT INTO cerebro.model_layers (model_version_id, position, kind, width)
    SELECT NEW.id, h.n, 'dense', h.w::int
    FROM jsonb_array_elements_text(coalesce(NEW.options->'hidden', '[]')) WITH ORDINALITY h(w, n);
    INSERT INTO cerebro.model_layers (model_version_id, position, kind, width)
    SELECT NEW.id, jsonb_array_length(coalesce(NEW.options->'hidden', '[]')) + b, 'residual',
           (NEW.options->'hidden'->>(jsonb_array_length(NEW.options->'hidden') - 1))::int
    FROM generate_series(1, coalesce((NEW.options->>'residual_blocks')::int, 0)) b;
    INSERT INTO cerebro.model_metrics (model_version_id, metric, value)
    SELECT NEW.id, m.key, m.value::text::double precision
    FROM jsonb_each(coalesce(NEW.metrics, '{}')) m WHERE jsonb_typeof(m.value) = 'number';
    INSERT INTO cerebro.model_importance (model_version_id, column_name, rank, importance, metric_drop)
    SELECT NEW.id, c.value->>'column', c.n, (c.value->>'importance')::double precision,
           (c.value->>'drop')::double precision
    FROM jsonb_array_elements(coalesce(NEW.importance->'columns', '[]')) WITH ORDINALITY c(value, n);
    RETURN NULL;
END
$$;
CREATE TRIGGER index_archive AFTER INSERT OR UPDATE OF features, options, metrics, importance ON cerebro.model_versions
    FOR EACH ROW EXECUTE FUNCTION cerebro.index_model_version();
REVOKE ALL ON FUNCTION cerebro.index_model_version() FROM PUBLIC;
UPDATE cerebro.model_versions SET metrics = metrics;

-- One row per version with what people search on; the caller's row-level
-- security applies (security_invoker).
CREATE VIEW cerebro.archive WITH (security_invoker = true) AS
SELECT m.name, m.version, m.status, m.task, m.source_relation, m.target_column,
       (SELECT count(*) FROM cerebro.model_layers l WHERE l.model_version_id = m.id)::int AS layers,
       ARRAY(SELECT l.width FROM cerebro.model_layers l WHERE l.model_version_id = m.id ORDER BY l.position)
           AS widths,
       ARRAY(SELECT f.column_name FROM cerebro.model_features f WHERE f.model_version_id = m.id
             ORDER BY f.column_name) AS features,
       -- The five columns that matter most, most important first.
       ARRAY(SELECT i.column_name FROM cerebro.model_importance i WHERE i.model_version_id = m.id
             ORDER BY i.rank LIMIT 5) AS top_columns,
       m.options->>'activation' AS activation, m.options->>'norm' AS norm,
       (m.options->>'dropout')::float8 AS dropout, m.options->>'optimizer' AS optimizer,
       (m.options->>'learning_rate')::float8 AS learning_rate,
       (m.metrics->>'auc')::float8 AS auc, (m.metrics->>'accuracy')::float8 AS accuracy,
       (m.metrics->>'log_loss')::float8 AS log_loss, (m.metrics->>'macro_f1')::float8 AS macro_f1,
       (m.metrics->>'rmse')::float8 AS rmse, (m.metrics->>'mae')::float8 AS mae, (m.metrics->>'r2')::float8 AS r2,
       m.created_by, m.created_at, m.trained_at, m.id AS model_version_id
FROM cerebro.model_versions m;

-- Each selection's candidates, best first: by validation AUC (binary),
-- accuracy (multiclass) or RMSE (regression); unfinished ones last.
CREATE VIEW cerebro.leaderboard WITH (security_invoker = true) AS
SELECT m.selection_id AS selection, m.name, m.version,
       rank() OVER (PARTITION BY m.selection_id ORDER BY
           CASE m.task WHEN 'binary' THEN -(m.metrics->>'auc')::float8
                       WHEN 'multiclass' THEN -(m.metrics->>'accuracy')::float8
                       ELSE (m.metrics->>'rmse')::float8 END NULLS LAST)::int AS rank,
       m.status, m.trained_with->>'stopped' AS stopped, m.source_relation AS source,
       ARRAY(SELECT f->>'name' FROM jsonb_array_elements(m.features) f) AS features,
       jsonb_strip_nulls(jsonb_build_object(
           'hidden', m.options->'hidden', 'residual_blocks', m.options->'residual_blocks',
           'activation', m.options->'activation', 'norm', m.options->'norm', 'dropout', m.options->'dropout',
           'optimizer', m.options->'optimizer', 'lr', m.options->'learning_rate',
           'batch_size', m.options->'batch_size', 'epochs', m.options->'epochs',
           'encodings', nullif(m.options->'encodings', '{}'::jsonb))) AS triple,
       m.metrics, m.epoch AS epochs_run,
       (SELECT sum(h.seconds) FROM cerebro.training_history h WHERE h.model_version_id = m.id) AS train_seconds,
       m.error,
       -- The selection's ensemble: the candidates it averages, with weights.
       m.trained_with->'ensemble'->'members' AS ensemble_of
FROM cerebro.model_versions m WHERE m.selection_id IS NOT NULL;

-- A model's versions as a tree: each derived version under its parent, with
-- the change along the edge and what its warm start took from the parent;
-- an ensemble lists the versions it averages, with their weights.
-- ORDER BY name, path lists a tree depth first.
CREATE VIEW cerebro.lineage WITH (security_invoker = true) AS
WITH RECURSIVE tree AS (
    SELECT m.id, 0 AS depth, ARRAY[m.version] AS path
    FROM cerebro.model_versions m WHERE m.parent_version IS NULL
    UNION ALL
    SELECT c.id, t.depth + 1, t.path || c.version
    FROM tree t JOIN cerebro.model_versions p ON p.id = t.id
    JOIN cerebro.model_versions c ON c.name = p.name AND c.parent_version = p.version
)
SELECT m.name, m.version, m.parent_version AS parent, m.change, t.depth, t.path,
       repeat('  ', t.depth) || 'v' || m.version AS tree,
       m.status, m.metrics, m.trained_with->'warm_start' AS warm_start, m.created_by, m.created_at,
       m.trained_with->'ensemble'->'members' AS ensemble_of
FROM tree t JOIN cerebro.model_versions m ON m.id = t.id;

ALTER TABLE cerebro.model_features ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.model_features FOR SELECT
    USING (EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.id = model_features.model_version_id));
ALTER TABLE cerebro.model_layers ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.model_layers FOR SELECT
    USING (EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.id = model_layers.model_version_id));
ALTER TABLE cerebro.model_metrics ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.model_metrics FOR SELECT
    USING (EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.id = model_metrics.model_version_id));
ALTER TABLE cerebro.model_importance ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.model_importance FOR SELECT
    USING (EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.id = model_importance.model_version_id));
GRANT SELECT ON cerebro.model_importance TO PUBLIC;
GRANT SELECT ON cerebro.model_features, cerebro.model_layers, cerebro.model_metrics, cerebro.archive,
    cerebro.selections, cerebro.leaderboard, cerebro.lineage TO PUBLIC;

-- What cerebrod's database role needs, and nothing more: it claims and
-- finishes jobs, reads snapshots, writes history and artifacts, closes
-- selections and holds the daemon lock. Row-level security hides other
-- roles' models, so the role also needs BYPASSRLS, which only a superuser
-- can give (docs/operations.md). Run by a superuser.
CREATE FUNCTION cerebro.grant_daemon_privileges(daemon text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    owner name := (SELECT r.rolname FROM pg_extension e JOIN pg_roles r ON r.oid = e.extowner
                   WHERE e.extname = 'cerebro');
BEGIN
    EXECUTE format('GRANT USAGE ON SCHEMA cerebro, cerebro_data TO %I', daemon);
    EXECUTE format('GRANT SELECT, UPDATE ON cerebro.jobs, cerebro.model_versions, cerebro.snapshots TO %I', daemon);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON cerebro.artifacts TO %I', daemon);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON cerebro.training_history TO %I', daemon);
    EXECUTE format('GRANT SELECT ON cerebro.selections TO %I', daemon);
    EXECUTE format('GRANT UPDATE (snapshot_cache_hits, snapshot_cache_bytes) ON cerebro.selections TO %I', daemon);
    EXECUTE format('GRANT UPDATE ON cerebro.daemon_lock TO %I', daemon);
    EXECUTE format('GRANT EXECUTE ON FUNCTION cerebro.finish_selection(bigint) TO %I', daemon);
    -- Snapshot tables, present and future (the extension owner creates them).
    EXECUTE format('GRANT SELECT ON ALL TABLES IN SCHEMA cerebro_data TO %I', daemon);
    EXECUTE format('ALTER DEFAULT PRIVILEGES FOR ROLE %I IN SCHEMA cerebro_data GRANT SELECT ON TABLES TO %I',
                   owner, daemon);
END
$$;
REVOKE ALL ON FUNCTION cerebro.grant_daemon_privileges(text) FROM PUBLIC;

-- Implemented in the extension's library (fdw/src/admin.rs); they
-- check the caller's rights, then write the catalog as the extension owner.
CREATE FUNCTION cerebro.deploy(model text, version integer, comment text DEFAULT NULL) RETURNS integer
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'deploy_wrapper';
CREATE FUNCTION cerebro.rollback(model text, comment text DEFAULT NULL) RETURNS integer
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'rollback_wrapper';
CREATE FUNCTION cerebro.export_onnx(model text, version integer) RETURNS bytea
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'export_onnx_wrapper';

-- One row's score, label or class probabilities, for application code (fdw/src/predict.rs):
-- SELECT cerebro.predict('churn', c) FROM customers c WHERE id = $1. STABLE:
-- within one statement every call scores with the same version.
CREATE FUNCTION cerebro.predict(model text, input anyelement, version integer DEFAULT NULL) RETURNS float8
    LANGUAGE c CALLED ON NULL INPUT STABLE PARALLEL RESTRICTED AS 'MODULE_PATHNAME', 'predict_wrapper';
CREATE FUNCTION cerebro.predict_label(model text, input anyelement, version integer DEFAULT NULL) RETURNS text
    LANGUAGE c CALLED ON NULL INPUT STABLE PARALLEL RESTRICTED AS 'MODULE_PATHNAME', 'predict_label_wrapper';
CREATE FUNCTION cerebro.predict_proba(model text, input anyelement, version integer DEFAULT NULL)
    RETURNS double precision[]
    LANGUAGE c CALLED ON NULL INPUT STABLE PARALLEL RESTRICTED AS 'MODULE_PATHNAME', 'predict_proba_wrapper';

-- A version's rule surrogate as rules (one row per leaf) and as a SQL CASE
-- expression over the source's columns (fdw/src/admin.rs).
CREATE FUNCTION cerebro.surrogate_rules(model text, version integer)
    RETURNS TABLE (leaf integer, rule text, prediction text, support bigint, share double precision)
    LANGUAGE c CALLED ON NULL INPUT STABLE AS 'MODULE_PATHNAME', 'surrogate_rules_wrapper';
CREATE FUNCTION cerebro.surrogate_sql(model text, version integer) RETURNS text
    LANGUAGE c CALLED ON NULL INPUT STABLE AS 'MODULE_PATHNAME', 'surrogate_sql_wrapper';
-- Fits the version's surrogate again, max_depth levels deep, on its training
-- snapshot (cerebrod scores it there) and stores it in place of the last.
CREATE FUNCTION cerebro.distill(model text, version integer, max_depth integer DEFAULT 4)
    RETURNS TABLE (leaves integer, fidelity_metric text, fidelity double precision, fitted_rows bigint)
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'distill_wrapper';
-- Measures the version's permutation importance again on its snapshot's
-- validation rows (cerebrod scores it as cerebro.predictions does) and stores it in
-- place of the last: for an imported version with a target, a candidate
-- halving stopped, or a version whose importance was never measured.
CREATE FUNCTION cerebro.measure_importance(model text, version integer)
    RETURNS TABLE (rank integer, column_name text, importance double precision, metric_drop double precision)
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'measure_importance_wrapper';

-- The best versions of the archived tasks nearest a source's by their
-- meta-features (cerebro.snapshots.meta), nearest first (fdw/src/recommend.rs).
CREATE FUNCTION cerebro.recommend(source text, target text, k integer DEFAULT 5, key text DEFAULT NULL)
    RETURNS TABLE (rank integer, model text, version integer, distance double precision, metric text,
                   value double precision, features text[], options jsonb, why text)
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'recommend_wrapper';

CREATE FUNCTION cerebro.reproduce(model text, version integer) RETURNS integer
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'reproduce_wrapper';
CREATE FUNCTION cerebro.import_onnx(name text, onnx bytea, source text, inputs jsonb, task text,
                                    labels text[] DEFAULT NULL, output text DEFAULT NULL, key text DEFAULT NULL,
                                    target text DEFAULT NULL)
    RETURNS integer
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'import_onnx_wrapper';
CREATE FUNCTION cerebro.cancel_selection(selection bigint) RETURNS integer
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'cancel_selection_wrapper';
CREATE FUNCTION cerebro.cancel(model text, version integer) RETURNS text
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'cancel_wrapper';
-- cerebrod calls it after each stack; it acts only on a selection with
-- nothing left to train, and only as its spec asked (promote). Internal:
-- only cerebrod's role may call it (cerebro.grant_daemon_privileges).
CREATE FUNCTION cerebro.finish_selection(selection bigint) RETURNS integer
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'finish_selection_wrapper';
REVOKE ALL ON FUNCTION cerebro.finish_selection(bigint) FROM PUBLIC;
CREATE FUNCTION cerebro.delete_model(model text, version integer) RETURNS bigint
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'delete_model_wrapper';
CREATE FUNCTION cerebro.grant_model(model text, grantee text) RETURNS void
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'grant_model_wrapper';
CREATE FUNCTION cerebro.revoke_model(model text, grantee text) RETURNS void
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'revoke_model_wrapper';

-- Who may see and score a model besides its owner: a role, and through it
-- its members.
CREATE TABLE cerebro.model_grants (
    name       text        NOT NULL,
    grantee    name        NOT NULL,
    granted_by name        NOT NULL,
    granted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, grantee)
);
SELECT pg_catalog.pg_extension_config_dump('cerebro.model_grants', '');

-- Whether `who` may see and score `model`: it owns it (created its first
-- version) or is a member of its owner, was granted it (or is a member of a
-- grantee), is a member of cerebro_admin, or is a superuser. In the
-- extension's library (fdw/src/access.rs): it reads the catalog as the
-- extension owner, so that the row-level security it serves does not apply
-- to itself, and it answers only about the calling role and roles whose
-- privileges the caller has, so nobody learns who may use what; policies
-- pass the querying role.
CREATE FUNCTION cerebro.may_use(model text, who text) RETURNS boolean
    LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'may_use_wrapper';

-- Row-level security: every role sees only the catalog rows of the models it
-- may use. The extension owner and the daemon's role bypass it (owner,
-- superuser or BYPASSRLS).
ALTER TABLE cerebro.model_versions ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.model_versions FOR SELECT USING (cerebro.may_use(name, current_user));
ALTER TABLE cerebro.training_history ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.training_history FOR SELECT
    USING (EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.id = training_history.model_version_id));
ALTER TABLE cerebro.jobs ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.jobs FOR SELECT
    USING (EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.id = jobs.model_version_id));
ALTER TABLE cerebro.snapshots ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.snapshots FOR SELECT
    USING (EXISTS (SELECT 1 FROM cerebro.model_versions m WHERE m.snapshot_id = snapshots.id));
ALTER TABLE cerebro.deployments ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.deployments FOR SELECT USING (cerebro.may_use(name, current_user));
ALTER TABLE cerebro.deployment_history ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.deployment_history FOR SELECT USING (cerebro.may_use(name, current_user));
ALTER TABLE cerebro.audit_log ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.audit_log FOR SELECT USING (cerebro.may_use(model, current_user));
ALTER TABLE cerebro.model_grants ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.model_grants FOR SELECT USING (cerebro.may_use(name, current_user));
ALTER TABLE cerebro.selections ENABLE ROW LEVEL SECURITY;
CREATE POLICY visible ON cerebro.selections FOR SELECT USING (cerebro.may_use(name, current_user));

GRANT SELECT ON cerebro.deployments, cerebro.deployment_history, cerebro.audit_log, cerebro.model_grants TO PUBLIC;

-- Snapshots keep the source's columns under neutral names: column i of a
-- snapshot table is c<i>, and `columns` lists the source column each holds.
-- pg_attribute, which every role can read, then shows nothing of a model's
-- columns. Every snapshot column has a built-in type (an enum was converted
-- to text by its output function when the snapshot was frozen, as the user
-- who froze it), so neither the extension owner nor cerebrod ever runs a
-- cast, operator or function a user wrote when they read one. Snapshots
-- frozen before are converted here.
ALTER TABLE cerebro.snapshots ADD COLUMN columns text[];
DO $$
DECLARE
    s record;
    c record;
    names text[];
    base oid;
BEGIN
    FOR s IN SELECT id, data_relation, pg_catalog.to_regclass(data_relation) AS rel FROM cerebro.snapshots LOOP
        names := '{}';
        IF s.rel IS NOT NULL THEN
            FOR c IN SELECT a.attnum, a.attname, a.atttypid
                     FROM pg_catalog.pg_attribute a
                     WHERE a.attrelid = s.rel AND a.attnum > 0 AND NOT a.attisdropped
                     ORDER BY a.attnum LOOP
                names := names || c.attname::text;
                -- Through every level of domains to the base type.
                base := c.atttypid;
                WHILE (SELECT t.typtype FROM pg_catalog.pg_type t WHERE t.oid = base) = 'd' LOOP
                    base := (SELECT t.typbasetype FROM pg_catalog.pg_type t WHERE t.oid = base);
                END LOOP;
                IF (SELECT t.typtype FROM pg_catalog.pg_type t WHERE t.oid = base) = 'e' THEN
                    EXECUTE pg_catalog.format(
                        'ALTER TABLE %s ALTER COLUMN %I TYPE pg_catalog.text '
                        'USING pg_catalog.textin(pg_catalog.enum_out((%I)::%s))',
                        s.rel, c.attname, c.attname, base::pg_catalog.regtype);
                END IF;
                EXECUTE pg_catalog.format('ALTER TABLE %s RENAME COLUMN %I TO %I',
                                          s.rel, c.attname, '__cerebro_renaming_' || pg_catalog.cardinality(names));
            END LOOP;
            FOR i IN 1 .. pg_catalog.cardinality(names) LOOP
                EXECUTE pg_catalog.format('ALTER TABLE %s RENAME COLUMN %I TO %I', s.rel, '__cerebro_renaming_' || i, 'c' || i);
            END LOOP;
        END IF;
        UPDATE cerebro.snapshots SET columns = names WHERE id = s.id;
    END LOOP;
END
$$;
ALTER TABLE cerebro.snapshots ALTER COLUMN columns SET NOT NULL;
-- What the task first frozen on the snapshot looks like (rows, feature
-- kinds, NULLs, cardinalities, target): shared/src/meta.rs, MetaFeatures;
-- what cerebro.recommend compares a new task with.
ALTER TABLE cerebro.snapshots ADD COLUMN meta jsonb;

-- The daemon lock: the one cerebrod serving a database holds this view
-- locked (EXCLUSIVE, in a transaction of its own), so a second one refuses to
-- start. Nobody else has a privilege on it, so nobody else can take the lock
-- (an advisory lock, which any role can take, let any role keep cerebrod
-- from starting). A view reads no table, so locking it locks nothing else,
-- and VACUUM and ANALYZE, which would wait for a locked table, skip views.
CREATE VIEW cerebro.daemon_lock AS SELECT;

-- Every model name ever used, one row each: INSERT, reproduce and import
-- lock a name's row (as the extension owner) while they number its next
-- version, so that concurrent ones number in turn. Nobody else has a
-- privilege on it, so nobody else can hold that lock (an advisory lock on the
-- name, which any role can take, let any role stall another's INSERTs).
CREATE TABLE cerebro.model_names (name text PRIMARY KEY);

-- Who wrote a version's source: a query source is its author's code, which
-- runs with the rights of whoever scores the model over it, so scoring
-- another role's query needs that author to have the scorer's rights
-- (docs/sql.md, "Security"). The inserting role, but for a reproduction (the
-- original's author) and a derived version that reads its parent's source
-- (the parent's). Existing versions: their creator, or the reproduced
-- version's author.
ALTER TABLE cerebro.model_versions ADD COLUMN source_author name;
WITH RECURSIVE authored (id, author) AS (
    SELECT m.id, m.created_by FROM cerebro.model_versions m WHERE m.reproduces IS NULL
    UNION ALL
    SELECT r.id, a.author FROM authored a
    JOIN cerebro.model_versions o ON o.id = a.id
    JOIN cerebro.model_versions r ON r.name = o.name AND r.reproduces = o.version
)
UPDATE cerebro.model_versions m SET source_author = a.author FROM authored a WHERE a.id = m.id;
UPDATE cerebro.model_versions SET source_author = created_by WHERE source_author IS NULL;
ALTER TABLE cerebro.model_versions ALTER COLUMN source_author SET NOT NULL;


-- Which version a name means when a query names none: the deployed one, else
-- the newest ready one. Derived models and `cerebrod score` ask this
-- function; cerebro.predictions and cerebro.predict, which resolve a version
-- at every call, write the same rule into their own queries
-- (cerebro_shared::resolved_version_sql!, in shared/src/sql.rs: change both
-- together). Runs with the caller's rights: a model a role may not use
-- resolves to nothing.
-- PL/pgSQL, not SQL: it keeps its plans for the session, where a SQL
-- function with a SET clause parses and plans its body at every call of a
-- new statement.
CREATE FUNCTION cerebro.resolve_version(name text, version integer DEFAULT NULL) RETURNS integer
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    RETURN coalesce(resolve_version.version,
                    (SELECT d.version FROM cerebro.deployments d WHERE d.name = resolve_version.name),
                    (SELECT max(r.version) FROM cerebro.model_versions r
                     WHERE r.name = resolve_version.name AND r.status = 'ready'));
END
$$;

-- Each class's probability, in the order of the model's class_labels: a
-- multiclass model's whole output, [1 - score, score] for a binary one,
-- NULL for regression (issue 15).
ALTER FOREIGN TABLE cerebro.predictions ADD COLUMN probabilities double precision[];

-- Per-row explanations (issue 16): WHERE explain [AND top_k = k] makes each
-- row's explanation the jsonb {baseline, contributions: [{column, value,
-- contribution}, ...] (the k largest, 5 unless top_k says), rest}, from
-- integrated gradients that cerebrod computes with the network's own
-- weights. baseline + the contributions + rest = score.
ALTER FOREIGN TABLE cerebro.predictions
    ADD COLUMN explain boolean,
    ADD COLUMN top_k integer,
    ADD COLUMN explanation jsonb;
