-- Path caches (actions/cache semantics): one row per stored archive.
--
-- An entry is immutable once `ready`. A save first claims (scope, key, version)
-- with a `pending` row, then writes the blob, then marks the row ready: two jobs
-- saving one key race on the insert, and the loser skips before uploading. A
-- pending row whose writer died is reaped by eviction, with its blob.
-- `version` is derived from the paths and the compression, so one key saved with
-- other paths is another entry. Sizes are of the compressed archive in the store.
create table path_caches (
    id                bigint      generated always as identity primary key,
    scope             text        not null,
    key               text        not null,
    version           text        not null,
    paths             text[]      not null,
    state             text        not null check (state in ('pending', 'ready')),
    size_bytes        bigint      not null default 0,
    content_bytes     bigint      not null default 0,
    compression       text        not null,
    storage_path      text        not null unique,
    created_at        timestamptz not null default now(),
    last_accessed_at  timestamptz not null default now(),
    access_count      bigint      not null default 0,
    created_by_job    text,
    unique (scope, key, version)
);
-- Restore: exact key, or the newest entry whose key starts with a restore key.
create index path_caches_lookup on path_caches (scope, version, created_at desc)
    where state = 'ready';
-- Eviction: least recently accessed first, per scope and overall.
create index path_caches_lru on path_caches (scope, last_accessed_at);
create index path_caches_pending on path_caches (created_at) where state = 'pending';
