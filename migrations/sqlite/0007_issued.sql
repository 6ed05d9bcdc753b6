-- Certificates the CA issued, recorded before they are installed: the chain
-- and key wait in a 0600 file under the state directory (order_keys' digest
-- of the order URL names it), so an install that fails is retried from disk
-- and never ordered again. installed_at is set once the certificate is in
-- cert_dir (or the record is dropped as unusable), and the file removed.
CREATE TABLE issued (
    order_url    TEXT PRIMARY KEY,
    cert_name    TEXT NOT NULL,
    identifiers  TEXT NOT NULL,                   -- JSON array, sorted
    serial       TEXT NOT NULL,
    not_after    INTEGER NOT NULL,
    issued_at    INTEGER NOT NULL,
    installed_at INTEGER
);
CREATE INDEX issued_waiting ON issued(cert_name, installed_at);
