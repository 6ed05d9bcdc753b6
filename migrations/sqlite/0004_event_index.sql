-- `status` counts authorizations held back for budget through their events.
CREATE INDEX events_by_authz ON events(authz_url) WHERE authz_url IS NOT NULL;
