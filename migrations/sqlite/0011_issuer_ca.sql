-- Several CAs: the CA (its name in the configuration) that issued the
-- installed certificate, so ARI, `replaces` and revocation go to it and
-- `status` shows it; NULL for certificates installed before, which the
-- single CA `default` issued.
ALTER TABLE certificates ADD COLUMN issuer_ca TEXT;

-- Per CA, the first failure (unreachable, 5xx) of the current streak:
-- fallback to the next CA is measured from it, across runs of
-- `certd renew` too. A success deletes the row.
CREATE TABLE ca_state (
    ca TEXT PRIMARY KEY,
    failing_since INTEGER NOT NULL,
    last_error TEXT NOT NULL
);
