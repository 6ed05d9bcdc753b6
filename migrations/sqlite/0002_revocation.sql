-- Revocation: the serial certd revoked for a certificate name, and when.
-- An installed certificate whose serial is revoked is due at once.
ALTER TABLE certificates ADD COLUMN revoked_serial TEXT;
ALTER TABLE certificates ADD COLUMN revoked_at INTEGER;
ALTER TABLE certificates ADD COLUMN revoked_reason TEXT;
