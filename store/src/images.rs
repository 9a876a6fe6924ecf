//! Images: content-addressed bundles, per tenant, plus the platform's built-in images.

use chrono::{DateTime, Utc};
use cloud_domain::api::{EventAction, Image, ImageManifest};
use uuid::Uuid;

use crate::bundle::{digest, hello_bundle, parse_bundle};
use crate::page::{self, Cursor};
use crate::{Store, StoreError, as_uuid, record_event};

#[derive(sqlx::FromRow)]
struct ImageRow {
    id: Uuid,
    name: String,
    digest: String,
    size_bytes: i64,
    command: Vec<String>,
    port: i32,
    builtin: bool,
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
            created_at: r.created_at,
        }
    }
}

const SELECT_IMAGE: &str = "SELECT id, name, digest, size_bytes, command, port, builtin, created_at FROM images";

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
        let mut tx = self.pool.begin().await?;
        let (quotas, _, _) = Self::lock_tenant(&mut tx, tenant).await?;
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
        sqlx::query("INSERT INTO image_blobs (digest, data) VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING")
            .bind(&digest)
            .bind(bundle)
            .execute(&mut *tx)
            .await?;
        let row: ImageRow = sqlx::query_as(
            "INSERT INTO images (id, tenant_id, name, digest, size_bytes, command, port)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant_id, name) WHERE tenant_id IS NOT NULL DO UPDATE
                 SET digest = EXCLUDED.digest, size_bytes = EXCLUDED.size_bytes, command = EXCLUDED.command,
                     port = EXCLUDED.port
             RETURNING id, name, digest, size_bytes, command, port, builtin, created_at",
        )
        .bind(Uuid::new_v4())
        .bind(tenant)
        .bind(name)
        .bind(&digest)
        .bind(bundle.len() as i64)
        .bind(&manifest.command)
        .bind(manifest.port as i32)
        .fetch_one(&mut *tx)
        .await?;
        let image = Image::from(row);
        let action = if exists { EventAction::Updated } else { EventAction::Created };
        record_event(&mut tx, Some(tenant), "image", image.id, action, &image).await?;
        tx.commit().await?;
        Ok(image)
    }

    /// An image visible to the tenant (its own first, then built-in) by name or id.
    pub async fn image(&self, tenant: Uuid, key: &str) -> Result<Image, StoreError> {
        let row: Option<ImageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{SELECT_IMAGE} WHERE (tenant_id = $1 OR tenant_id IS NULL) AND (name = $2 OR id = $3)
             ORDER BY tenant_id NULLS LAST LIMIT 1"
        )))
        .bind(tenant)
        .bind(key)
        .bind(as_uuid(key))
        .fetch_optional(&self.pool)
        .await?;
        row.map(Image::from).ok_or_else(|| StoreError::NotFound { kind: "image", key: key.to_owned() })
    }

    /// The bundle bytes of a digest.
    pub async fn image_bundle(&self, digest: &str) -> Result<Vec<u8>, StoreError> {
        let row: Option<(Vec<u8>,)> = sqlx::query_as("SELECT data FROM image_blobs WHERE digest = $1")
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|(d,)| d).ok_or_else(|| StoreError::NotFound { kind: "image bundle", key: digest.to_owned() })
    }

    /// A page of the images visible to the tenant (built-in and its own) in creation order.
    pub async fn list_images(
        &self,
        tenant: Uuid,
        cursor: Option<Cursor>,
        limit: usize,
    ) -> Result<(Vec<Image>, Option<Cursor>), StoreError> {
        let (ts, id) = page::after(cursor);
        let rows: Vec<ImageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "{SELECT_IMAGE} WHERE (tenant_id = $1 OR tenant_id IS NULL)
               AND ($2::timestamptz IS NULL OR (created_at, id) > ($2, $3))
             ORDER BY created_at, id LIMIT $4"
        )))
        .bind(tenant)
        .bind(ts)
        .bind(id)
        .bind(limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        let rows = rows.into_iter().map(Image::from).collect();
        Ok(page::finish(rows, limit, |i: &Image| Cursor { created_at: i.created_at, id: i.id }))
    }

    /// Deletes one of the tenant's images, refused while instances use it; an unreferenced bundle goes too.
    pub async fn delete_image(&self, tenant: Uuid, key: &str) -> Result<(), StoreError> {
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
        sqlx::query(
            "DELETE FROM image_blobs b WHERE digest = $1
               AND NOT EXISTS (SELECT 1 FROM images WHERE digest = b.digest)
               AND NOT EXISTS (SELECT 1 FROM instances WHERE image_digest = b.digest)",
        )
        .bind(&image.digest)
        .execute(&mut *tx)
        .await?;
        record_event(&mut tx, Some(tenant), "image", image.id, EventAction::Deleted, &image).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Registers (or refreshes) the built-in images.
    pub(crate) async fn ensure_builtin_images(&self) -> Result<(), StoreError> {
        let bundle = hello_bundle();
        let (manifest, digest) = parse_bundle(&bundle).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO image_blobs (digest, data) VALUES ($1, $2) ON CONFLICT (digest) DO NOTHING")
            .bind(&digest)
            .bind(&bundle)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO images (id, tenant_id, name, digest, size_bytes, command, port)
             VALUES ($1, NULL, 'hello', $2, $3, $4, $5)
             ON CONFLICT (name) WHERE tenant_id IS NULL DO UPDATE
                 SET digest = EXCLUDED.digest, size_bytes = EXCLUDED.size_bytes, command = EXCLUDED.command,
                     port = EXCLUDED.port",
        )
        .bind(Uuid::new_v4())
        .bind(&digest)
        .bind(bundle.len() as i64)
        .bind(&manifest.command)
        .bind(manifest.port as i32)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
