-- What each certificate is, as the fleet's hosts define it: what is
-- ordered (names, key type, profile, challenges, CAs), not each host's own
-- reload commands. Hosts whose definitions differ would order different
-- things under one lease, so only a host with the fleet's definition
-- claims it (see src/app/fleet_order.rs for the rule that lets a rolling
-- update replace it).

-- Each host's definition of each certificate it serves, as it last said.
CREATE TABLE cert_definitions (
    cert_name text   NOT NULL,
    host_id   text   NOT NULL,
    -- the hash of the whole definition
    hash      text   NOT NULL,
    -- one `field=hash` line per field, to name the fields that differ
    fields    text   NOT NULL,
    -- Unix seconds, the ledger's clock
    seen_at   bigint NOT NULL,
    PRIMARY KEY (cert_name, host_id)
);

-- The fleet's definition of each certificate: the one its leaseholders
-- order, recorded by the first holder and replaced under the lease.
CREATE TABLE fleet_cert_definitions (
    cert_name   text   PRIMARY KEY,
    hash        text   NOT NULL,
    fields      text   NOT NULL,
    -- the host that recorded it
    host_id     text   NOT NULL,
    recorded_at bigint NOT NULL
);
