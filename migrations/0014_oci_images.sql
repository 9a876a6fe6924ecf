-- OCI images beside bundles. An OCI image's digest is its manifest's; the manifest, its config and its layers
-- are rows of image_blobs like a bundle, each stored once by digest and shared between images and tenants.
ALTER TABLE images
    ADD COLUMN format text NOT NULL DEFAULT 'bundle' CHECK (format IN ('bundle', 'oci')),
    -- 'upload', or the registry reference it was pulled from.
    ADD COLUMN source text NOT NULL DEFAULT 'upload';

-- The blobs a manifest names (its config and layers), so that a blob goes when no stored manifest needs it.
CREATE TABLE manifest_blobs (
    manifest  text NOT NULL REFERENCES image_blobs (digest) ON DELETE CASCADE,
    blob      text NOT NULL REFERENCES image_blobs (digest),
    PRIMARY KEY (manifest, blob)
);
CREATE INDEX manifest_blobs_blob ON manifest_blobs (blob);
