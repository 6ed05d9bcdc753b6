-- Fleet mode: the tables several certd hosts share in one PostgreSQL (15+).
-- Times the database compares (lease expiry, heartbeats) are timestamptz
-- and written with now(), so only the database's clock decides them; host
-- clocks are never compared.

-- Who is in the fleet, and when each host was last heard from.
CREATE TABLE fleet_members (
    host_id     text PRIMARY KEY,
    version     text NOT NULL,
    -- where this host answers http-01, so a pre-flight can ask every host
    http01_addr text,
    -- a hash of the host's [[certificate]] sections: drift shows in status
    config_hash text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

-- One lease per certificate (cert:<name>), per account's reaper
-- (reaper:<account>) and for creating an account (account:<directory>).
-- The epoch is the fencing token: every claim raises it, nothing lowers or
-- resets it, and a release clears the holder but keeps the epoch.
CREATE TABLE leases (
    name        text PRIMARY KEY CHECK (name ~ '^(cert|reaper|account):.'),
    holder      text,
    epoch       bigint NOT NULL DEFAULT 0 CHECK (epoch >= 0),
    expires_at  timestamptz NOT NULL DEFAULT '-infinity',
    acquired_at timestamptz
);

-- Every certificate issued through the fleet, with its private key sealed
-- under the fleet key (AES-256-GCM; the blob carries its key id, nonce and
-- tag). key_id is derived from the blob so it cannot disagree with it; a
-- key rotation finds the rows still sealed under the old key by it.
CREATE TABLE issued (
    id            bigserial PRIMARY KEY,
    cert_name     text NOT NULL,
    serial        text NOT NULL,
    fullchain_pem text NOT NULL,
    sealed_key    bytea NOT NULL,
    key_id        text GENERATED ALWAYS AS (encode(substring(sealed_key FROM 2 FOR 8), 'hex')) STORED,
    -- the lease epoch under which it was written
    epoch         bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (cert_name, serial)
);
CREATE INDEX issued_key_id ON issued (key_id);

-- Fleet-wide secrets (the ACME account keys), sealed like issued keys.
CREATE TABLE fleet_secrets (
    name       text PRIMARY KEY,
    sealed     bytea NOT NULL,
    key_id     text GENERATED ALWAYS AS (encode(substring(sealed FROM 2 FOR 8), 'hex')) STORED,
    epoch      bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The answers to pending challenges, so whichever host the CA's validation
-- request reaches can answer it, not only the host that ordered.
CREATE TABLE challenge_responses (
    token             text PRIMARY KEY,
    kind              text NOT NULL CHECK (kind IN ('http-01', 'tls-alpn-01')),
    identifier        text NOT NULL,
    key_authorization text NOT NULL,
    cert_name         text NOT NULL,
    authz_url         text NOT NULL,
    epoch             bigint NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    expires_at        timestamptz NOT NULL
);
-- tls-alpn-01 is looked up by name (the handshake carries no token).
CREATE INDEX challenge_alpn ON challenge_responses (identifier) WHERE kind = 'tls-alpn-01';
