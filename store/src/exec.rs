//! Exec sessions: the API's authorization of one command in one instance, which the instance's node takes once.
//! The session is an event too (`exec`): who ran what where is in the tenant's audit trail.

use std::time::Duration;

use cloud_domain::api::EventAction;
use uuid::Uuid;

use crate::page::{self, RowLock, Table, Visible};
use crate::{Store, StoreError, record_event};

/// A command the API authorizes.
#[derive(Debug, Clone)]
pub struct NewExec<'a> {
    /// The caller's tenant.
    pub tenant: Uuid,
    /// The caller's token, for the audit.
    pub token: Uuid,
    /// The instance's name or id.
    pub instance: &'a str,
    /// The command and its arguments.
    pub command: &'a [String],
    /// Whether it runs on a terminal, and the terminal's size.
    pub tty: Option<(u16, u16)>,
    /// SHA-256 of the secret the API will present to the node.
    pub secret_hash: &'a [u8],
    /// How long the node may take to be asked.
    pub ttl: Duration,
}

/// Where an authorized command runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecTarget {
    /// The session's id.
    pub session: Uuid,
    /// The instance's id.
    pub instance_id: Uuid,
    /// The instance's name.
    pub instance: String,
    /// Its node's name.
    pub node: String,
    /// Where that node takes exec connections (`host:port`).
    pub exec_address: String,
}

/// What a node needs to run a session's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecClaim {
    /// The instance.
    pub instance_id: Uuid,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Whether on a terminal, and its size.
    pub tty: Option<(u16, u16)>,
}

#[derive(serde::Serialize)]
struct Audit<'a> {
    instance: &'a str,
    instance_id: Uuid,
    node: &'a str,
    command: &'a [String],
    tty: bool,
    token_id: Uuid,
}

impl Store {
    /// Authorizes a command in a running instance of the tenant, recording it (and its event) for its node.
    pub async fn create_exec_session(&self, new: &NewExec<'_>) -> Result<ExecTarget, StoreError> {
        self.bounded(async {
            let mut tx = self.pool.begin().await?;
            let table = Table {
                select: "SELECT i.id, i.name, i.state, n.id AS node_id, n.name AS node, n.exec_address
                         FROM instances i LEFT JOIN nodes n ON n.id = i.node_id",
                alias: "i.",
            };
            type Row = (Uuid, String, String, Option<Uuid>, Option<String>, Option<String>);
            let found: Option<Row> =
                page::find(&mut *tx, table, Visible::Tenant(new.tenant), new.instance, RowLock::None).await?;
            let (id, name, state, node_id, node, address) =
                found.ok_or_else(|| StoreError::NotFound { kind: "instance", key: new.instance.to_owned() })?;
            // Kept until the session is recorded (a lock on the outer join's nullable side is not allowed).
            sqlx::query("SELECT 1 FROM instances WHERE id = $1 FOR SHARE").bind(id).execute(&mut *tx).await?;
            let (Some(node_id), Some(node), "running") = (node_id, node, state.as_str()) else {
                return Err(StoreError::NotRunning { name, state });
            };
            let address = address.ok_or_else(|| StoreError::NodeUnavailable {
                node: node.clone(),
                why: "its agent takes no exec connections (exec_listen is off, or it is an older version)".into(),
            })?;
            // Sessions are taken within seconds; a day of them is plenty to look back on.
            sqlx::query("DELETE FROM exec_sessions WHERE created_at < now() - interval '1 day'")
                .execute(&mut *tx)
                .await?;
            let session = Uuid::new_v4();
            let (cols, rows) = new.tty.unwrap_or((80, 24));
            sqlx::query(
                "INSERT INTO exec_sessions (id, tenant_id, instance_id, node_id, token_id, secret_hash, command, tty,
                     cols, rows, expires_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now() + make_interval(secs => $11))",
            )
            .bind(session)
            .bind(new.tenant)
            .bind(id)
            .bind(node_id)
            .bind(new.token)
            .bind(new.secret_hash)
            .bind(new.command)
            .bind(new.tty.is_some())
            .bind(i32::from(cols))
            .bind(i32::from(rows))
            .bind(new.ttl.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            let audit = Audit {
                instance: &name,
                instance_id: id,
                node: &node,
                command: new.command,
                tty: new.tty.is_some(),
                token_id: new.token,
            };
            record_event(&mut tx, Some(new.tenant), "exec", session, EventAction::Created, &audit).await?;
            tx.commit().await?;
            Ok(ExecTarget { session, instance_id: id, instance: name, node, exec_address: address })
        })
        .await
    }

    /// Takes a session for `node`, once, if its secret matches, it has not expired and its instance still runs
    /// there. Anything else is "not found": the caller learns nothing more.
    pub async fn claim_exec_session(
        &self,
        node: Uuid,
        session: Uuid,
        secret_hash: &[u8],
    ) -> Result<ExecClaim, StoreError> {
        self.bounded(async {
            let row: Option<(Uuid, Vec<String>, bool, i32, i32)> = sqlx::query_as(
                "UPDATE exec_sessions x SET claimed_at = now()
                 FROM instances i
                 WHERE x.id = $1 AND x.node_id = $2 AND x.secret_hash = $3 AND x.claimed_at IS NULL
                   AND x.expires_at > now() AND i.id = x.instance_id AND i.node_id = $2 AND i.state = 'running'
                 RETURNING x.instance_id, x.command, x.tty, x.cols, x.rows",
            )
            .bind(session)
            .bind(node)
            .bind(secret_hash)
            .fetch_optional(&self.pool)
            .await?;
            let (instance_id, command, tty, cols, rows) =
                row.ok_or_else(|| StoreError::NotFound { kind: "exec session", key: session.to_string() })?;
            let size = (u16::try_from(cols).unwrap_or(80), u16::try_from(rows).unwrap_or(24));
            Ok(ExecClaim { instance_id, command, tty: tty.then_some(size) })
        })
        .await
    }

    /// Records where a node takes exec connections (`None`: it takes none).
    pub async fn set_exec_address(&self, node: Uuid, address: Option<&str>) -> Result<(), StoreError> {
        self.bounded(async {
            sqlx::query("UPDATE nodes SET exec_address = $2 WHERE id = $1")
                .bind(node)
                .bind(address)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
        .await
    }
}
