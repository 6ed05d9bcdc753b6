-- The private key of a finalized order, sealed with the fleet key (the
-- order's URL as associated data), stored before `finalize` is sent: a
-- peer that takes the certificate's lease over downloads the certificate
-- with it instead of ordering again. Never stored unsealed. Gone once the
-- certificate is installed or the order abandoned.
CREATE TABLE order_keys (
    order_url  text PRIMARY KEY,
    sealed     bytea NOT NULL,
    created_at bigint NOT NULL
);
