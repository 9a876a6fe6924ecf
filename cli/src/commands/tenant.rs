//! `cloudctl tenant`: tenants and their quotas (admin).

use clap::{Args, Subcommand};
use cloud_domain::api::{CreateTenant, QuotasPatch, Tenant, UpdateTenant};

use crate::client::{Client, seg};
use crate::output::{self, Format, print};
use crate::target::ListRemote;

/// `cloudctl tenant ...`
#[derive(Debug, Subcommand)]
pub enum TenantCmd {
    /// List tenants.
    #[command(after_help = "Examples:\n  cloudctl tenant list\n  cloudctl tenant list prod:", visible_alias = "ls")]
    List {
        #[command(flatten)]
        remote: ListRemote,
    },
    /// Show a tenant.
    #[command(after_help = "Example:\n  cloudctl tenant get acme")]
    Get {
        /// Name or id.
        name: String,
    },
    /// Create a tenant.
    #[command(after_help = "Example:\n  cloudctl tenant create acme --max-instances 50")]
    Create {
        /// Tenant name.
        name: String,
        #[command(flatten)]
        quotas: QuotaOpts,
    },
    /// Change a tenant's quotas.
    #[command(after_help = "Example:\n  cloudctl tenant update acme --max-memory-mb 8192")]
    Update {
        /// Name or id.
        name: String,
        #[command(flatten)]
        quotas: QuotaOpts,
    },
    /// Delete an empty tenant.
    #[command(after_help = "Example:\n  cloudctl tenant delete acme", visible_alias = "rm")]
    Delete {
        /// Name or id.
        name: String,
    },
}

/// Quota flags.
#[derive(Debug, Args)]
pub struct QuotaOpts {
    /// Services at once.
    #[arg(long)]
    max_services: Option<u32>,
    /// Instances at once.
    #[arg(long)]
    max_instances: Option<u32>,
    /// Memory of all instances, MiB.
    #[arg(long)]
    max_memory_mb: Option<u64>,
    /// Images at once.
    #[arg(long)]
    max_images: Option<u32>,
    /// Extra domains over all services at once.
    #[arg(long)]
    max_domains: Option<u32>,
}

impl QuotaOpts {
    fn patch(&self) -> QuotasPatch {
        QuotasPatch {
            max_services: self.max_services,
            max_instances: self.max_instances,
            max_memory_mb: self.max_memory_mb,
            max_images: self.max_images,
            max_domains: self.max_domains,
        }
    }
}

pub(crate) async fn run(c: &Client, cmd: &TenantCmd, out: Format) -> anyhow::Result<()> {
    let name_of = |t: &Tenant| t.name.clone();
    match cmd {
        TenantCmd::List { .. } => crate::list(c, "/v1/tenants", false, out, output::tenants, name_of).await?,
        TenantCmd::Get { name } => {
            let t: Tenant = c.get(&format!("/v1/tenants/{}", seg(name))).await?;
            print(out, &[t], output::tenants, name_of, true)?;
        }
        TenantCmd::Create { name, quotas } => {
            let t: Tenant = c.post("/v1/tenants", &CreateTenant { name: name.clone(), quotas: quotas.patch() }).await?;
            print(out, &[t], output::tenants, name_of, true)?;
        }
        TenantCmd::Update { name, quotas } => {
            let t: Tenant =
                c.patch(&format!("/v1/tenants/{}", seg(name)), &UpdateTenant { quotas: quotas.patch() }).await?;
            print(out, &[t], output::tenants, name_of, true)?;
        }
        TenantCmd::Delete { name } => {
            c.delete(&format!("/v1/tenants/{}", seg(name))).await?;
            eprintln!("deleted tenant {name}");
        }
    }
    Ok(())
}
