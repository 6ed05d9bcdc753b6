-- The ACME profile of the installed certificate, and the preference it was
-- ordered under: a changed `profile` setting makes the certificate due.
-- NULL for certificates installed before this column existed: unknown,
-- so they are not renewed early only for it.
ALTER TABLE certificates ADD COLUMN profile TEXT;
ALTER TABLE certificates ADD COLUMN profile_wanted TEXT;
-- Why the last order did not get the first configured profile (the CA no
-- longer lists it), for `status`; NULL when it did.
ALTER TABLE certificates ADD COLUMN profile_warning TEXT;
