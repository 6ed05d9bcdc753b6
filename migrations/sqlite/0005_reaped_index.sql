-- `status` counts the reaper's deactivations per account; without an index
-- that is a scan of every authorization the host ever had.
CREATE INDEX authz_reaped ON authorizations(account_id, deactivated_at) WHERE deactivated_by = 'reaper';
