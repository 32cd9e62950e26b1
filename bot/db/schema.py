"""The schema, as migrations: entry i moves the database from version i to i+1, and
`PRAGMA user_version` records where a file stands, so an old database upgrades in place."""

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        member_id INTEGER NOT NULL,
        guild_id INTEGER,
        channel_id INTEGER,
        interaction_id INTEGER,
        prompt TEXT NOT NULL,
        negative_prompt TEXT NOT NULL DEFAULT '',
        seed INTEGER NOT NULL,
        count INTEGER NOT NULL,
        steps INTEGER NOT NULL,
        guidance REAL NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        scheduler TEXT NOT NULL,
        model TEXT NOT NULL,
        mode TEXT NOT NULL DEFAULT 'text',
        strength REAL,
        status TEXT NOT NULL DEFAULT 'queued'
            CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        queued_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        batch_id INTEGER REFERENCES batches(id),
        batch_size INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        withheld INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        result_channel_id INTEGER,
        result_message_id INTEGER
    );
    CREATE INDEX jobs_by_status ON jobs (status, queued_at, id);
    CREATE INDEX jobs_by_member ON jobs (member_id, queued_at);
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        model TEXT NOT NULL,
        images INTEGER NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL
    );
    """,
    """
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        guild_id INTEGER NOT NULL,
        member_id INTEGER NOT NULL,
        job_id INTEGER REFERENCES jobs(id) ON DELETE SET NULL,
        kind TEXT NOT NULL CHECK (kind IN ('charge', 'refund')),
        images INTEGER NOT NULL,
        window_at REAL NOT NULL,
        recorded_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX ledger_once_per_job ON ledger (job_id, kind) WHERE job_id IS NOT NULL;
    CREATE INDEX ledger_by_member ON ledger (member_id, guild_id, window_at);
    CREATE TABLE member_quotas (
        guild_id INTEGER NOT NULL,
        member_id INTEGER NOT NULL,
        daily_limit INTEGER,
        reset_at REAL,
        UNIQUE (guild_id, member_id)
    );
    CREATE TABLE guild_settings (
        guild_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (guild_id, name)
    );
    CREATE TABLE bans (
        guild_id INTEGER NOT NULL,
        member_id INTEGER NOT NULL,
        reason TEXT,
        moderator_id INTEGER NOT NULL,
        at REAL NOT NULL,
        UNIQUE (guild_id, member_id)
    );
    CREATE TABLE blocklist (
        guild_id INTEGER NOT NULL,
        term TEXT NOT NULL,
        normalized TEXT NOT NULL,
        moderator_id INTEGER NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (guild_id, normalized)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        guild_id INTEGER,
        moderator_id INTEGER NOT NULL,
        action TEXT NOT NULL,
        target_id INTEGER,
        detail TEXT,
        at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN parent_job_id INTEGER REFERENCES jobs(id) ON DELETE SET NULL;
    ALTER TABLE jobs ADD COLUMN parent_image_index INTEGER;
    ALTER TABLE jobs ADD COLUMN init_image_hash TEXT;
    CREATE TABLE speeds (
        model TEXT NOT NULL,
        pixels INTEGER NOT NULL,
        images INTEGER NOT NULL,
        seconds_per_step REAL NOT NULL,
        PRIMARY KEY (model, pixels, images)
    );
    CREATE TABLE member_defaults (
        member_id INTEGER PRIMARY KEY,
        steps INTEGER,
        width INTEGER,
        height INTEGER,
        scheduler TEXT,
        negative_prompt TEXT,
        count INTEGER,
        private INTEGER NOT NULL DEFAULT 0
    );
    """,
    """
    CREATE TABLE init_images (
        hash TEXT PRIMARY KEY,
        png BLOB NOT NULL,
        stored_at REAL NOT NULL
    );
    CREATE INDEX jobs_by_result ON jobs (result_message_id);
    """,
    """
    CREATE TABLE app_state (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    """,
    # Quotas count cost units (GenerationRequest.cost: one 512×512 image at 25 steps is 1)
    # instead of images. The ledger keeps them as integer thousandths of a unit: costs are
    # rounded to thousandths, so integer sums stay exact where REAL sums would drift (0.1 +
    # 0.2 != 0.3). An old charge of n images becomes n units (n × 1000), and limits, already
    # numbers, now read as units: nobody's standing changes at the upgrade. The index lets
    # admission count a member's queued or running jobs without scanning the queue.
    """
    ALTER TABLE ledger RENAME COLUMN images TO milliunits;
    UPDATE ledger SET milliunits = milliunits * 1000;
    CREATE INDEX jobs_by_member_status ON jobs (member_id, status);
    """,
    # Each job's fair-share weight (ROLE_WEIGHTS at admission), so a restart keeps it.
    """
    ALTER TABLE jobs ADD COLUMN weight REAL NOT NULL DEFAULT 1;
    """,
    # A job's LoRAs (JSON [[name, weight], ...], sorted by name), the box of its init image kept
    # as it is when it paints around it (JSON [left, top, right, bottom]: Zoom Out, Pan), and
    # what made it from its parent (Upscale, Zoom Out, Pan), for history and the result.
    """
    ALTER TABLE jobs ADD COLUMN loras TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN keep_box TEXT;
    ALTER TABLE jobs ADD COLUMN operation TEXT;
    """,
    # A member's default model from /settings (an allowlist name; ignored once the owner no
    # longer offers it).
    """
    ALTER TABLE member_defaults ADD COLUMN model TEXT;
    """,
)
