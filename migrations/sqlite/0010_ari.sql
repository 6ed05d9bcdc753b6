-- The CA's last ARI answer (RFC 9773) for the installed certificate, for
-- `status` and the notify command: the suggested window, the explanation
-- URL, when it was asked and when it will be asked again, and the last
-- error (NULL after a good answer). `ari_serial` names the certificate
-- the answer is about, so a renewed certificate does not show its
-- predecessor's window.
ALTER TABLE certificates ADD COLUMN ari_serial TEXT;
ALTER TABLE certificates ADD COLUMN ari_window_start INTEGER;
ALTER TABLE certificates ADD COLUMN ari_window_end INTEGER;
ALTER TABLE certificates ADD COLUMN ari_explanation_url TEXT;
ALTER TABLE certificates ADD COLUMN ari_checked_at INTEGER;
ALTER TABLE certificates ADD COLUMN ari_next_check INTEGER;
ALTER TABLE certificates ADD COLUMN ari_error TEXT;
