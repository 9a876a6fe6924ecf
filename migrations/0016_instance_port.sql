-- The port an instance listens on: its image's unless it was created with another. Fixed at creation, like its
-- image digest, so pushing a new version of the image changes neither for existing instances.
ALTER TABLE instances ADD COLUMN port integer CHECK (port BETWEEN 1 AND 65535);
UPDATE instances i SET port = m.port FROM images m WHERE m.id = i.image_id;
ALTER TABLE instances ALTER COLUMN port SET NOT NULL;
