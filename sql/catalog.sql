-- Cerebro's durable catalog, created by CREATE EXTENSION cerebro.
--
-- Everything the daemon knows lives here: models and their versions, the
-- frozen training data (snapshots), the job queue, ONNX artifacts and
-- per-epoch history. The daemon can be killed at any moment; these tables
-- are the truth it recovers from.
--
-- Users never write these tables directly: INSERT INTO cerebro.models
-- validates a request as the calling user and writes here with the
-- extension owner's rights.

CREATE TYPE cerebro.model_status AS ENUM ('queued', 'training', 'ready', 'failed');
CREATE TYPE cerebro.job_state AS ENUM ('queued', 'running', 'done', 'failed');

-- Frozen training data: a copy of the rows a model was trained on, taken
-- inside the INSERT's transaction with the calling user's privileges.
CREATE TABLE cerebro.snapshots (
    id              bigserial PRIMARY KEY,
    source_relation text        NOT NULL,  -- as resolved, schema-qualified
    query           text        NOT NULL,  -- the query that filled the snapshot
    data_relation   text        NOT NULL,  -- cerebro_data.snapshot_<id>
    row_count       bigint      NOT NULL,
    frozen          boolean     NOT NULL DEFAULT true,
    fingerprint     text,                  -- sha256 of the rows as the daemon read them
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      name        NOT NULL
);

CREATE TABLE cerebro.model_versions (
    id              bigserial PRIMARY KEY,
    name            text                 NOT NULL,
    version         integer              NOT NULL,
    status          cerebro.model_status NOT NULL DEFAULT 'queued',
    task            text                 NOT NULL CHECK (task IN ('binary', 'multiclass', 'regression')),
    source_relation text                 NOT NULL,
    target_column   text                 NOT NULL,
    key_column      text,
    features        jsonb                NOT NULL,  -- [{"name": ..., "kind": "numeric" | "categorical"}]
    class_labels    text[]               NOT NULL DEFAULT '{}',
    options         jsonb                NOT NULL,  -- architecture and tuning, defaults resolved
    snapshot_id     bigint               NOT NULL REFERENCES cerebro.snapshots (id),
    epoch           integer              NOT NULL DEFAULT 0,
    epochs          integer              NOT NULL,
    metrics         jsonb,
    pipeline        jsonb,                          -- fitted feature pipeline (scalers, vocabularies)
    artifact_sha256 text,
    error           text,
    created_at      timestamptz          NOT NULL DEFAULT now(),
    created_by      name                 NOT NULL,
    started_at      timestamptz,
    trained_at      timestamptz,
    UNIQUE (name, version)
);

-- The job queue. The daemon claims with FOR UPDATE SKIP LOCKED; a job left
-- 'running' by a daemon that died is requeued (or failed after max_attempts)
-- when a daemon starts.
CREATE TABLE cerebro.jobs (
    id               bigserial PRIMARY KEY,
    model_version_id bigint            NOT NULL UNIQUE REFERENCES cerebro.model_versions (id) ON DELETE CASCADE,
    state            cerebro.job_state NOT NULL DEFAULT 'queued',
    attempts         integer           NOT NULL DEFAULT 0,
    max_attempts     integer           NOT NULL DEFAULT 3,
    claimed_by       text,
    claimed_at       timestamptz,
    finished_at      timestamptz,
    error            text,
    created_at       timestamptz       NOT NULL DEFAULT now()
);
CREATE INDEX jobs_pending ON cerebro.jobs (id) WHERE state IN ('queued', 'running');

CREATE TABLE cerebro.artifacts (
    model_version_id bigint      PRIMARY KEY REFERENCES cerebro.model_versions (id) ON DELETE CASCADE,
    format           text        NOT NULL DEFAULT 'onnx',
    sha256           text        NOT NULL,
    size_bytes       bigint      NOT NULL,
    bytes            bytea       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE cerebro.training_history (
    model_version_id bigint           NOT NULL REFERENCES cerebro.model_versions (id) ON DELETE CASCADE,
    epoch            integer          NOT NULL,
    train_loss       double precision NOT NULL,
    valid_loss       double precision NOT NULL,
    seconds          double precision NOT NULL,
    recorded_at      timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (model_version_id, epoch)
);

-- Snapshot tables live apart from user schemas; only the extension owner and
-- the daemon read them. USAGE lets the INSERT fill a new snapshot with the
-- calling user's privileges (it is granted INSERT on that one table for the
-- duration of the statement); it reveals no data.
CREATE SCHEMA cerebro_data;
GRANT USAGE ON SCHEMA cerebro_data TO PUBLIC;

CREATE FOREIGN DATA WRAPPER cerebro_fdw
    HANDLER cerebro.cerebro_fdw_handler
    VALIDATOR cerebro.cerebro_fdw_validator;

-- The daemon's control socket; deployments set the real path with
-- ALTER SERVER cerebro_daemon OPTIONS (SET socket '...').
CREATE SERVER cerebro_daemon FOREIGN DATA WRAPPER cerebro_fdw
    OPTIONS (socket '/run/cerebro/cerebrod.sock');

CREATE FOREIGN TABLE cerebro.models (
    name       text,
    version    integer,
    status     text,
    task       text,
    source     text,
    target     text,
    key        text,
    features   text[],
    options    jsonb,
    epoch      integer,
    epochs     integer,
    progress   text,
    metrics    jsonb,
    error      text,
    created_at timestamptz,
    created_by text,
    trained_at timestamptz
) SERVER cerebro_daemon OPTIONS (object 'models', rowid_column 'name');

CREATE FOREIGN TABLE cerebro.predictions (
    model      text,
    version    integer,
    source     text,
    key_column text,
    key        text,
    label      text,
    score      double precision
) SERVER cerebro_daemon OPTIONS (object 'predictions');

GRANT USAGE ON SCHEMA cerebro TO PUBLIC;
GRANT SELECT, INSERT ON cerebro.models TO PUBLIC;
GRANT SELECT ON cerebro.predictions TO PUBLIC;
GRANT SELECT ON cerebro.model_versions, cerebro.jobs, cerebro.snapshots, cerebro.training_history TO PUBLIC;
