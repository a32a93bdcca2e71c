-- Cerebro 0.1.0 -> 0.2.0: deployments with rollback and their history, the
-- audit log, ONNX export, and a catalog that pg_dump keeps.
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
    action    text        NOT NULL CHECK (action IN ('create', 'deploy', 'rollback', 'delete', 'export', 'grant', 'revoke')),
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

-- Implemented in the extension's library (fdw/src/deployments.rs); they
-- check the caller's rights, then write the catalog as the extension owner.
CREATE FUNCTION cerebro.deploy(model text, version integer, comment text DEFAULT NULL) RETURNS integer
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'deploy_wrapper';
CREATE FUNCTION cerebro.rollback(model text, comment text DEFAULT NULL) RETURNS integer
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'rollback_wrapper';
CREATE FUNCTION cerebro.export_onnx(model text, version integer) RETURNS bytea
    LANGUAGE c CALLED ON NULL INPUT VOLATILE AS 'MODULE_PATHNAME', 'export_onnx_wrapper';

GRANT SELECT ON cerebro.deployments, cerebro.deployment_history, cerebro.audit_log TO PUBLIC;
