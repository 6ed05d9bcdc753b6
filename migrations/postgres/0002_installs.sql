-- What each host did with each issuance it pulled: installed it (when, and
-- what its reload commands said) or could not (why). One row per host and
-- issuance; a retry of the same issuance replaces the row.
CREATE TABLE installs (
    host_id       text NOT NULL,
    cert_name     text NOT NULL,
    serial        text NOT NULL,
    -- NULL while this host has not installed it
    installed_at  timestamptz,
    -- the reload commands' outcomes, when installed
    reload_result text,
    -- why this host could not install it (wrong fleet key, chain refused,
    -- disk), when not installed
    error         text,
    attempted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host_id, cert_name, serial),
    FOREIGN KEY (cert_name, serial) REFERENCES issued (cert_name, serial) ON DELETE CASCADE,
    CHECK ((installed_at IS NULL) = (error IS NOT NULL))
);
-- The newest issuance per certificate is what every host pulls.
CREATE INDEX issued_newest ON issued (cert_name, id DESC);
