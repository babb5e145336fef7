-- Frozen copy of the catalog schema version 1, as released. Never edit: the
-- migration test builds a v1 catalog from it and upgrades it with the current code.
    CREATE TABLE groups (
        name TEXT PRIMARY KEY NOT NULL CHECK (length(name) > 0),
        objectives TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL
    );
    CREATE TABLE pools (
        name TEXT PRIMARY KEY NOT NULL CHECK (length(name) > 0),
        backend TEXT NOT NULL CHECK (backend IN ('lvm', 'dir')),
        location TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'degraded', 'missing')),
        state_reason TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL
    );
    CREATE TABLE pool_devices (
        pool TEXT NOT NULL REFERENCES pools(name) ON DELETE CASCADE,
        device_path TEXT NOT NULL UNIQUE,
        major INTEGER,
        minor INTEGER,
        size INTEGER NOT NULL CHECK (size >= 0),
        serial TEXT,
        capacity INTEGER NOT NULL CHECK (capacity >= 0),
        state TEXT NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'missing', 'failed')),
        added REAL NOT NULL,
        PRIMARY KEY (pool, device_path)
    );
    CREATE TABLE volumes (
        name TEXT PRIMARY KEY NOT NULL CHECK (length(name) > 0),
        device_path TEXT NOT NULL UNIQUE,
        major INTEGER,
        minor INTEGER,
        size INTEGER NOT NULL CHECK (size >= 0),
        serial TEXT,
        chunk_size INTEGER NOT NULL CHECK (chunk_size > 0),
        tracker_backend TEXT NOT NULL,
        tracker_state TEXT NOT NULL DEFAULT 'unknown'
            CHECK (tracker_state IN ('exact', 'unknown')),
        tracker_reason TEXT NOT NULL DEFAULT '',
        objectives TEXT NOT NULL DEFAULT '{}',
        group_name TEXT REFERENCES groups(name) ON DELETE RESTRICT,
        pool_name TEXT REFERENCES pools(name) ON DELETE RESTRICT,
        created REAL NOT NULL
    );
CREATE INDEX volumes_group ON volumes(group_name);
CREATE INDEX volumes_pool ON volumes(pool_name);
    CREATE TABLE perf (
        device_key TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('pool', 'volume')),
        device_path TEXT,
        capacity INTEGER,
        rotational INTEGER CHECK (rotational IN (0, 1)),
        transport TEXT,
        layout TEXT,
        seq_read REAL,
        seq_write REAL,
        rand_read REAL,
        rand_write REAL,
        chunk_size INTEGER,
        measured_at REAL NOT NULL,
        source TEXT NOT NULL CHECK (source IN ('probe', 'live')),
        PRIMARY KEY (device_key, kind)
    );
    CREATE TABLE generations (
        id TEXT PRIMARY KEY NOT NULL,
        volume TEXT NOT NULL REFERENCES volumes(name) ON DELETE CASCADE,
        pool TEXT NOT NULL REFERENCES pools(name) ON DELETE RESTRICT,
        kind TEXT NOT NULL CHECK (kind IN ('full', 'differential', 'incremental')),
        base TEXT REFERENCES generations(id) DEFERRABLE INITIALLY DEFERRED,
        parent TEXT REFERENCES generations(id) DEFERRABLE INITIALLY DEFERRED,
        created REAL NOT NULL,
        bytes_stored INTEGER NOT NULL DEFAULT 0 CHECK (bytes_stored >= 0),
        chunks INTEGER NOT NULL DEFAULT 0 CHECK (chunks >= 0),
        state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'committed')),
        committed_at REAL,
        location TEXT NOT NULL DEFAULT '{}',
        manifest_checksum TEXT,
        CHECK ((kind = 'full') = (base IS NULL)),
        CHECK ((state = 'committed') = (committed_at IS NOT NULL))
    );
CREATE INDEX generations_volume ON generations(volume, created);
CREATE INDEX generations_base ON generations(base);
CREATE INDEX generations_parent ON generations(parent);
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('backup', 'restore', 'verify')),
        volume TEXT,
        state TEXT NOT NULL
            CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        progress REAL NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
        bytes_done INTEGER NOT NULL DEFAULT 0 CHECK (bytes_done >= 0),
        bytes_total INTEGER CHECK (bytes_total IS NULL OR bytes_total >= 0),
        created REAL NOT NULL,
        started REAL,
        finished REAL,
        error TEXT
    );
CREATE INDEX jobs_volume ON jobs(volume, created);
CREATE INDEX jobs_state ON jobs(state);
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        job TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
        at REAL NOT NULL,
        state TEXT NOT NULL,
        message TEXT NOT NULL DEFAULT ''
    );
CREATE INDEX job_events_job ON job_events(job, seq);
