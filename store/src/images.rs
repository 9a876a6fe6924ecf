//! Images: OCI images and directory bundles, per tenant, plus the platform's built-in images. Every blob (a
//! bundle, a manifest, a config, a layer) is stored once by digest and shared by the images that name it.

use chrono::{DateTime, Utc};
use cloud_domain::api::{EventAction, Image, ImageFormat, ImageManifest};
use futures_util::TryFutureExt;
use uuid::Uuid;

use crate::bundle::digest;
use crate::page::{self, Cursor, RowLock, Table, Visible};
use crate::{Store, StoreError, record_event};

#[derive(sqlx::FromRow)]
struct ImageRow {
    id: Uuid,
    name: String,
    digest: String,
    size_bytes: i64,
    command: Vec<String>,
    port: i32,
    builtin: bool,
    format: String,
    source: String,
    created_at: DateTime<Utc>,
}

impl From<ImageRow> for Image {
    fn from(r: ImageRow) -> Self {
        Image {
            id: r.id,
            name: r.name,
            digest: r.digest,
            size_bytes: r.size_bytes as u64,
            command: r.command,
            port: r.port as u16,
            builtin: r.builtin,
            format: if r.format == "oci" { ImageFormat::Oci } else { ImageFormat::Bundle },
            source: r.source,
            created_at: r.created_at,
        }
    }
}

const IMAGE_COLUMNS: &str = "id, name, digest, size_bytes, command, port, builtin, format, source, created_at";
const SELECT_IMAGE: &str =
    "SELECT id, name, digest, size_bytes, command, port, builtin, format, source, created_at FROM images";
const IMAGES: Table = Table { select: SELECT_IMAGE, alias: "" };

/// The port an OCI image runs on when it exposes none, as Fly.io's default internal port.
pub const DEFAULT_IMAGE_PORT: u16 = 8080;

/// An OCI image's blobs, written once by digest; the manifest's list of what it names.
async fn put_blobs(tx: &mut sqlx::PgConnection, image: &cloud_oci::Image) -> Result<(), StoreError> {
    let blobs = std::iter::once((&image.digest, &image.manifest))
        .chain(std::iter::once((&image.config_blob.digest, &image.config_blob.data)))
        .chain(image.layer_blobs.iter().map(|b| (&b.digest, &b.data)));
    for (digest, data) in blobs {
        sqlx::query("INSERT INTO image_blobs (digest, data) VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING")
            .bind(digest.as_str())
            .bind(data.as_ref())
            .execute(&mut *tx)
            .await?;
    }
    let named: Vec<&str> = std::iter::once(image.config_blob.digest.as_str())
        .chain(image.layers.iter().map(|l| l.digest.as_str()))
        .collect();
    sqlx::query(
        "INSERT INTO manifest_blobs (manifest, blob) SELECT $1, b FROM unnest($2::text[]) b
         ON CONFLICT DO NOTHING",
    )
    .bind(image.digest.as_str())
    .bind(&named)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// An image row to store.
struct NewImage<'a> {
    digest: &'a str,
    size: u64,
    command: &'a [String],
    port: u16,
    format: ImageFormat,
    source: &'a str,
}

/// What an OCI image runs: its command and port.
fn oci_run(image: &cloud_oci::Image) -> Result<(Vec<String>, u16), StoreError> {
    let command = image.config.argv();
    if command.is_empty() {
        return Err(StoreError::InvalidImage(
            "the image names no program to run: its config has neither Entrypoint nor Cmd".into(),
        ));
    }
    Ok((command, image.config.exposed_ports.first().copied().unwrap_or(DEFAULT_IMAGE_PORT)))
}

impl Store {
    /// Stores a checked bundle under a name; pushing a name again points it at the new bundle (instances keep
    /// the digest they were created with).
    pub async fn put_image(
        &self,
        tenant: Uuid,
        name: &str,
        manifest: &ImageManifest,
        bundle: &[u8],
    ) -> Result<Image, StoreError> {
        let digest = digest(bundle);
        self.bounded_for(self.bulk_timeout(bundle.len() as u64), async {
            let mut tx = self.pool.begin().await?;
            let exists = Self::reserve_image_name(&mut tx, tenant, name).await?;
            sqlx::query("INSERT INTO image_blobs (digest, data) VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING")
                .bind(&digest)
                .bind(bundle)
                .execute(&mut *tx)
                .await?;
            let row = NewImage {
                digest: &digest,
                size: bundle.len() as u64,
                command: &manifest.command,
                port: manifest.port,
                format: ImageFormat::Bundle,
                source: "upload",
            };
            let image = Self::upsert_image(&mut tx, tenant, name, &row, exists).await?;
            tx.commit().await?;
            Ok(image)
        })
        .await
    }

    /// Stores a verified OCI image under a name (`source`: `upload` or the registry reference); pushing a name
    /// again points it at the new image (instances keep the digest they were created with).
    pub async fn put_oci_image(
        &self,
        tenant: Uuid,
        name: &str,
        image: &cloud_oci::Image,
        source: &str,
    ) -> Result<Image, StoreError> {
        let (command, port) = oci_run(image)?;
        let size = image.stored_bytes() + image.manifest.len() as u64;
        self.bounded_for(self.bulk_timeout(size), async {
            let mut tx = self.pool.begin().await?;
            let exists = Self::reserve_image_name(&mut tx, tenant, name).await?;
            put_blobs(&mut tx, image).await?;
            let row = NewImage {
                digest: image.digest.as_str(),
                size,
                command: &command,
                port,
                format: ImageFormat::Oci,
                source,
            };
            let stored = Self::upsert_image(&mut tx, tenant, name, &row, exists).await?;
            tx.commit().await?;
            Ok(stored)
        })
        .await
    }

    /// Whether the tenant has an image of that name already; refused when it has none and is at its quota.
    async fn reserve_image_name(tx: &mut sqlx::PgConnection, tenant: Uuid, name: &str) -> Result<bool, StoreError> {
        let (quotas, _, _) = Self::lock_tenant(&mut *tx, tenant).await?;
        let (count, exists): (i64, bool) =
            sqlx::query_as("SELECT count(*), coalesce(bool_or(name = $2), false) FROM images WHERE tenant_id = $1")
                .bind(tenant)
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        if !exists && count >= quotas.max_images as i64 {
            return Err(StoreError::QuotaExceeded {
                detail: format!("max_images is {} and the tenant has {count}", quotas.max_images),
            });
        }
        Ok(exists)
    }

    /// Points the tenant's image `name` at `row` (a new image, or a new version of one) and records the event.
    async fn upsert_image(
        tx: &mut sqlx::PgConnection,
        tenant: Uuid,
        name: &str,
        row: &NewImage<'_>,
        exists: bool,
    ) -> Result<Image, StoreError> {
        let stored: ImageRow = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "INSERT INTO images (id, tenant_id, name, digest, size_bytes, command, port, format, source)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (tenant_id, name) WHERE tenant_id IS NOT NULL DO UPDATE
                 SET digest = EXCLUDED.digest, size_bytes = EXCLUDED.size_bytes, command = EXCLUDED.command,
                     port = EXCLUDED.port, format = EXCLUDED.format, source = EXCLUDED.source
             RETURNING {IMAGE_COLUMNS}"
        )))
        .bind(Uuid::new_v4())
        .bind(tenant)
        .bind(name)
        .bind(row.digest)
        .bind(row.size as i64)
        .bind(row.command)
        .bind(row.port as i32)
        .bind(row.format.as_str())
        .bind(row.source)
        .fetch_one(&mut *tx)
        .await?;
        let image = Image::from(stored);
        let action = if exists { EventAction::Updated } else { EventAction::Created };
        record_event(&mut *tx, Some(tenant), "image", image.id, action, &image).await?;
        Ok(image)
    }

    /// An image visible to the tenant (its own first, then built-in) by name or id.
    pub async fn image(&self, tenant: Uuid, key: &str) -> Result<Image, StoreError> {
        self.bounded(async {
            let visible = Visible::TenantOrBuiltin(tenant);
            let row: Option<ImageRow> = page::find(&self.pool, IMAGES, visible, key, RowLock::None).await?;
            row.map(Image::from).ok_or_else(|| StoreError::NotFound { kind: "image", key: key.to_owned() })
        })
        .await
    }

    /// The bytes of a blob (a bundle, a manifest, a config or a layer) by digest.
    pub async fn image_bundle(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let missing = || StoreError::NotFound { kind: "image bundle", key: digest.to_owned() };
        // Its size first (octet_length reads it without the data), to know how long reading it may take.
        let size: Option<(i32,)> = self
            .bounded(
                sqlx::query_as("SELECT octet_length(data) FROM image_blobs WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(&self.pool)
                    .map_err(StoreError::from),
            )
            .await?;
        let (size,) = size.ok_or_else(missing)?;
        let row: Option<(Vec<u8>,)> = self
            .bounded_for(
                self.bulk_timeout(size.max(0) as u64),
                sqlx::query_as("SELECT data FROM image_blobs WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(&self.pool)
                    .map_err(StoreError::from),
            )
            .await?;
        row.map(|(d,)| d).ok_or_else(missing)
    }

    /// Fails unless `digest` is a version of `image` the tenant may read: its current one, or one that the
    /// tenant's instances of it still run (a name pushed again leaves its instances on the version they were
    /// created with, and that version's blobs stay while they do).
    pub async fn check_image_version(&self, tenant: Uuid, image: &Image, digest: &str) -> Result<(), StoreError> {
        if image.digest == digest {
            return Ok(());
        }
        self.bounded(async {
            let (runs,): (bool,) = sqlx::query_as(
                "SELECT EXISTS (SELECT 1 FROM instances WHERE tenant_id = $1 AND image_id = $2 AND image_digest = $3)",
            )
            .bind(tenant)
            .bind(image.id)
            .bind(digest)
            .fetch_one(&self.pool)
            .await?;
            match runs {
                true => Ok(()),
                false => Err(StoreError::NotFound { kind: "image version", key: format!("{}@{digest}", image.name) }),
            }
        })
        .await
    }

    /// The sizes of blobs in bytes, in the order asked; a blob not stored is not found.
    pub async fn image_blob_sizes(&self, digests: &[&str]) -> Result<Vec<u64>, StoreError> {
        self.bounded(async {
            let rows: Vec<(String, i32)> =
                sqlx::query_as("SELECT digest, octet_length(data) FROM image_blobs WHERE digest = ANY($1)")
                    .bind(digests)
                    .fetch_all(&self.pool)
                    .await?;
            digests
                .iter()
                .map(|d| match rows.iter().find(|(r, _)| r == d) {
                    Some((_, size)) => Ok(*size as u64),
                    None => Err(StoreError::NotFound { kind: "image blob", key: (*d).to_owned() }),
                })
                .collect()
        })
        .await
    }

    /// A page of the images visible to the tenant (built-in and its own) in creation order.
    pub async fn list_images(
        &self,
        tenant: Uuid,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Image>, Option<Cursor>), StoreError> {
        self.bounded(async {
            let visible = Visible::TenantOrBuiltin(tenant);
            let key = |r: &ImageRow| Cursor { created_at: r.created_at, id: r.id };
            let (rows, next) = page::list(&self.pool, IMAGES, visible, cursor, limit, key).await?;
            Ok((rows.into_iter().map(Image::from).collect(), next))
        })
        .await
    }

    /// Deletes one of the tenant's images, refused while instances use it; an unreferenced bundle goes too.
    pub async fn delete_image(&self, tenant: Uuid, key: &str) -> Result<(), StoreError> {
        self.bounded(async {
            let image = self.image(tenant, key).await?;
            if image.builtin {
                return Err(StoreError::Invalid(format!("image \"{}\" is built in and cannot be deleted", image.name)));
            }
            let mut tx = self.pool.begin().await?;
            sqlx::query("SELECT 1 FROM images WHERE id = $1 FOR UPDATE").bind(image.id).execute(&mut *tx).await?;
            let (users,): (i64,) = sqlx::query_as("SELECT count(*) FROM instances WHERE image_id = $1")
                .bind(image.id)
                .fetch_one(&mut *tx)
                .await?;
            if users > 0 {
                return Err(StoreError::ImageInUse { name: image.name, count: users });
            }
            sqlx::query("DELETE FROM images WHERE id = $1 AND tenant_id = $2")
                .bind(image.id)
                .bind(tenant)
                .execute(&mut *tx)
                .await?;
            Self::collect_blobs(&mut tx, &image.digest).await?;
            record_event(&mut tx, Some(tenant), "image", image.id, EventAction::Deleted, &image).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Deletes a bundle or manifest no image or instance names any more, and then the blobs of that manifest
    /// no other stored manifest names.
    async fn collect_blobs(tx: &mut sqlx::PgConnection, digest: &str) -> Result<(), StoreError> {
        let unused: Option<(String,)> = sqlx::query_as(
            "SELECT digest FROM image_blobs b WHERE digest = $1
               AND NOT EXISTS (SELECT 1 FROM images WHERE digest = b.digest)
               AND NOT EXISTS (SELECT 1 FROM instances WHERE image_digest = b.digest)
             FOR UPDATE",
        )
        .bind(digest)
        .fetch_optional(&mut *tx)
        .await?;
        if unused.is_none() {
            return Ok(());
        }
        let named: Vec<(String,)> = sqlx::query_as("DELETE FROM manifest_blobs WHERE manifest = $1 RETURNING blob")
            .bind(digest)
            .fetch_all(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM image_blobs WHERE digest = $1").bind(digest).execute(&mut *tx).await?;
        let named: Vec<String> = named.into_iter().map(|(b,)| b).collect();
        sqlx::query(
            "DELETE FROM image_blobs b WHERE digest = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM manifest_blobs m WHERE m.blob = b.digest)
               AND NOT EXISTS (SELECT 1 FROM images WHERE digest = b.digest)
               AND NOT EXISTS (SELECT 1 FROM instances WHERE image_digest = b.digest)",
        )
        .bind(&named)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// Registers (or refreshes) the built-in images.
    pub(crate) async fn ensure_builtin_images(&self) -> Result<(), StoreError> {
        let hello = cloud_builtin::hello();
        let (command, port) = oci_run(&hello)?;
        let mut tx = self.pool.begin().await?;
        put_blobs(&mut tx, &hello).await?;
        let previous: Option<(String,)> =
            sqlx::query_as("SELECT digest FROM images WHERE name = 'hello' AND tenant_id IS NULL")
                .fetch_optional(&mut *tx)
                .await?;
        sqlx::query(
            "INSERT INTO images (id, tenant_id, name, digest, size_bytes, command, port, format, source)
             VALUES ($1, NULL, 'hello', $2, $3, $4, $5, 'oci', 'builtin')
             ON CONFLICT (name) WHERE tenant_id IS NULL DO UPDATE
                 SET digest = EXCLUDED.digest, size_bytes = EXCLUDED.size_bytes, command = EXCLUDED.command,
                     port = EXCLUDED.port, format = 'oci', source = 'builtin'",
        )
        .bind(Uuid::new_v4())
        .bind(hello.digest.as_str())
        .bind((hello.stored_bytes() + hello.manifest.len() as u64) as i64)
        .bind(&command)
        .bind(port as i32)
        .execute(&mut *tx)
        .await?;
        if let Some((old,)) = previous.filter(|(d,)| d != hello.digest.as_str()) {
            // The platform's own image: its instances run the new version from their next start (an earlier
            // platform's hello, a bundle run by the host's `cloudd`, cannot run in a sandbox at all). The previous
            // version's blobs then go.
            sqlx::query(
                "UPDATE instances SET image_digest = $1
                 WHERE image_digest = $2 AND image_id IN (SELECT id FROM images WHERE name = 'hello' AND tenant_id IS NULL)",
            )
            .bind(hello.digest.as_str())
            .bind(&old)
            .execute(&mut *tx)
            .await?;
            Self::collect_blobs(&mut tx, &old).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
