-- berth's first schema: requirement locks, the image cache, job executions.

-- A requirement set's canonical text and its resolved lock. The lock depends on
-- the Python version it was resolved for, so that is part of the key: the same
-- unpinned `numpy` resolves differently for 3.11 and 3.13.
create table requirements (
    deps_hash       text        not null,
    python_version  text        not null,
    canonical       text        not null,
    lock            text        not null,
    pinned          boolean     not null,
    resolved_at     timestamptz not null default now(),
    last_used_at    timestamptz not null default now(),
    primary key (deps_hash, python_version)
);
create index requirements_last_used on requirements (last_used_at desc);
create index requirements_resolved_unpinned on requirements (resolved_at) where not pinned;

-- One row per image key. `ready` rows point at an image on the engine,
-- `failed` rows are the negative cache (with the installer's error), and
-- `evicted` rows are kept for history after eviction removed the image.
create table image_cache (
    image_key       text        primary key,
    runtime         text        not null,
    base_image      text        not null,
    base_digest     text        not null,
    deps_hash       text        not null,
    lock_hash       text        not null,
    recipe_version  integer     not null,
    image_tag       text        not null,
    image_id        text,
    engine_id       text,
    size_bytes      bigint,
    status          text        not null check (status in ('ready', 'failed', 'evicted')),
    error           text,
    build_seconds   double precision,
    created_at      timestamptz not null default now(),
    last_used_at    timestamptz not null default now(),
    use_count       bigint      not null default 0
);
create index image_cache_last_used on image_cache (last_used_at desc) where status = 'ready';
create index image_cache_deps on image_cache (deps_hash);
create index image_cache_runtime on image_cache (runtime, status);

-- One row per job id, upserted: arq may run a job twice after a worker dies.
create table executions (
    job_id              text        primary key,
    status              text        not null check (status in (
                            'queued', 'building', 'running', 'succeeded', 'failed',
                            'timeout', 'oom', 'error', 'cancelled')),
    runtime             text        not null,
    script_hash         text,
    deps_hash           text,
    image_key           text,
    execution_key       text,
    exit_code           integer,
    stdout              bytea,
    stderr              bytea,
    stdout_truncated    boolean     not null default false,
    stderr_truncated    boolean     not null default false,
    outputs_truncated   boolean     not null default false,
    error               text,
    attempts            integer     not null default 0,
    worker              text,
    cache_hit           boolean,
    reused_from         text,
    timeout_s           double precision,
    queued_at           timestamptz not null default now(),
    started_at          timestamptz,
    image_ready_at      timestamptz,
    run_started_at      timestamptz,
    finished_at         timestamptz,
    deadline_at         timestamptz,
    timings             jsonb       not null default '{}'::jsonb,
    details             jsonb       not null default '{}'::jsonb
);
create index executions_status_deadline on executions (status, deadline_at)
    where status in ('building', 'running');
create index executions_finished on executions (finished_at);
create index executions_queued on executions (queued_at);
create index executions_execution_key on executions (execution_key, finished_at desc)
    where status = 'succeeded';

-- Files a job wrote under out/, each capped; removed with their execution.
create table execution_files (
    job_id      text    not null references executions (job_id) on delete cascade,
    name        text    not null,
    size_bytes  bigint  not null,
    content     bytea   not null,
    primary key (job_id, name)
);
