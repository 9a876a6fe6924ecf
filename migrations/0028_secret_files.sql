-- A secret may reach its instances as the file /run/secrets/<name> (read-only, the instance user's alone, on a
-- memory file system) instead of an environment variable.
ALTER TABLE secrets ADD COLUMN as_file boolean NOT NULL DEFAULT false;
