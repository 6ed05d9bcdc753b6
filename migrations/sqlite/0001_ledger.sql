-- The ledger. Times are Unix seconds (UTC). Rows are updated, never deleted:
-- every ACME object certd creates stays visible to `certd status` and
-- `certd authz list`.

-- One row per ACME account (per directory URL). The private key is not here:
-- it lives in a 0600 file in the state directory, so reading the ledger can
-- never leak it.
CREATE TABLE accounts (
    id            INTEGER PRIMARY KEY,
    directory_url TEXT NOT NULL UNIQUE,
    account_url   TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);

-- One row per configured certificate name: what is installed and how the
-- last attempt went.
CREATE TABLE certificates (
    name                 TEXT PRIMARY KEY,
    domains              TEXT NOT NULL,          -- JSON array, as last installed or attempted
    serial               TEXT,
    not_before           INTEGER,
    not_after            INTEGER,
    installed_at         INTEGER,
    version              TEXT,                   -- directory name of the installed version
    last_attempt_at      INTEGER,
    last_result          TEXT CHECK (last_result IN ('ok', 'error')),
    last_error           TEXT,
    next_renewal_at      INTEGER,
    consecutive_failures INTEGER NOT NULL DEFAULT 0,
    updated_at           INTEGER NOT NULL
);

CREATE TABLE orders (
    id          INTEGER PRIMARY KEY,
    url         TEXT NOT NULL UNIQUE,
    account_id  INTEGER NOT NULL REFERENCES accounts(id),
    cert_name   TEXT NOT NULL,
    identifiers TEXT NOT NULL,                   -- JSON array, sorted
    status      TEXT NOT NULL,                   -- as the CA last reported it
    step        TEXT NOT NULL,                   -- the driver's state machine
    error       TEXT,                            -- problem document (JSON) or local error
    expires_at  INTEGER,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX orders_by_cert ON orders(cert_name, id);
CREATE INDEX orders_in_flight ON orders(step) WHERE step NOT IN ('done', 'failed', 'abandoned');

CREATE TABLE authorizations (
    id               INTEGER PRIMARY KEY,
    url              TEXT NOT NULL UNIQUE,
    account_id       INTEGER NOT NULL REFERENCES accounts(id),
    identifier       TEXT NOT NULL,
    status           TEXT NOT NULL,              -- pending valid invalid deactivated expired revoked gone
    challenge_type   TEXT,                       -- the type certd chose to answer
    challenge_url    TEXT,
    error            TEXT,                       -- problem document (JSON)
    expires_at       INTEGER,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    deactivated_at   INTEGER,
    deactivated_by   TEXT,                       -- driver, reaper, cli
    deactivated_from TEXT,                       -- the status it had: pending costs failure budget, valid does not
    check_attempts   INTEGER NOT NULL DEFAULT 0, -- failed reaper calls in a row
    check_after      INTEGER,                    -- reaper backoff
    check_error      TEXT
);
CREATE INDEX authz_pending ON authorizations(account_id, created_at) WHERE status = 'pending';
CREATE INDEX authz_by_identifier ON authorizations(identifier, updated_at);

-- A CA may hand the same authorization to several orders.
CREATE TABLE order_authorizations (
    order_id INTEGER NOT NULL REFERENCES orders(id),
    authz_id INTEGER NOT NULL REFERENCES authorizations(id),
    PRIMARY KEY (order_id, authz_id)
) WITHOUT ROWID;
CREATE INDEX order_authorizations_by_authz ON order_authorizations(authz_id);

-- Every challenge URL with its parent authorization: users often hold only a
-- challenge URL, and deactivation must be POSTed to the authorization.
CREATE TABLE challenges (
    url      TEXT PRIMARY KEY,
    authz_id INTEGER NOT NULL REFERENCES authorizations(id),
    type     TEXT NOT NULL,
    status   TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX challenges_by_authz ON challenges(authz_id);

CREATE TABLE events (
    id        INTEGER PRIMARY KEY,
    at        INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    cert_name TEXT,
    order_url TEXT,
    authz_url TEXT,
    detail    TEXT
);
CREATE INDEX events_by_cert ON events(cert_name, id);
CREATE INDEX events_by_kind ON events(kind, at);
