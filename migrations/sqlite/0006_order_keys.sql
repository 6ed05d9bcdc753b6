-- Write-ahead for newOrder: the ledger learns that an order is about to be
-- created before the request is sent, so an order the CA created just before
-- a crash (its URL never reached the ledger) can be matched to its
-- certificate and adopted at recovery. A row lives from just before
-- newOrder until the order itself is recorded.
CREATE TABLE order_intents (
    id          INTEGER PRIMARY KEY,
    account_id  INTEGER NOT NULL REFERENCES accounts(id),
    cert_name   TEXT NOT NULL,
    identifiers TEXT NOT NULL,                   -- JSON array, sorted
    created_at  INTEGER NOT NULL
);
CREATE INDEX order_intents_by_identifiers ON order_intents(account_id, identifiers, id);
