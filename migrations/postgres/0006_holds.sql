-- The fleet's failure backoff: after an order of a certificate failed, the
-- host that tried records here, under the certificate's lease and before
-- it lets the lease go, when the fleet may try again. A peer that claims
-- the lease earlier holds back. `certificates.next_renewal_at` cannot
-- carry it: each host writes its own plan there.
CREATE TABLE fleet_holds (
    cert_name   text   PRIMARY KEY,
    -- the names the failed order was for (JSON, as certificates.domains):
    -- a certificate that names others since is not held back
    domains     text   NOT NULL,
    -- Unix seconds, the ledger's clock: no order before then
    until       bigint NOT NULL,
    -- why the last attempt failed, as its host logged it
    error       text   NOT NULL,
    -- the host that failed, and when
    host_id     text   NOT NULL,
    recorded_at bigint NOT NULL
);
