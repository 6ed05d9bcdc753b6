-- Per-order lookups that run before every newOrder (reuse of an unfinished
-- order for the same names, the CA-limit guard) must not scan all orders:
-- a daemon with thousands of certificates would slow down as it works.
CREATE INDEX orders_by_identifiers ON orders(account_id, identifiers, id);
CREATE INDEX orders_by_created ON orders(account_id, created_at);
