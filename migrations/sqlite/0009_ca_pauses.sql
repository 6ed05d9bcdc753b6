-- A CA's rate limit in force: no new order for the scope before until_at.
-- scope is a certificate name, or '' for the whole account. A row lives
-- from the CA's answer until an order of that scope succeeds, so the
-- daemon after a restart and `certd status` (another process) know it.
CREATE TABLE ca_pauses (
    scope       TEXT PRIMARY KEY,
    until_at    INTEGER NOT NULL,
    paused      INTEGER NOT NULL,                -- 1: the CA paused the names
    unpause_url TEXT,
    detail      TEXT NOT NULL,
    since       INTEGER NOT NULL
);
