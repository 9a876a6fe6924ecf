//! `cloudctl image`: images pushed from files or pulled from registries.

use std::path::PathBuf;

use clap::Subcommand;
use cloud_domain::api::Image;

use crate::client::{Client, seg};
use crate::image;
use crate::output::{self, Format, print};
use crate::target::ListRemote;

/// `cloudctl image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// List images.
    #[command(
        after_help = "Examples:\n  cloudctl image list -o name\n  cloudctl image list prod:",
        visible_alias = "ls"
    )]
    List {
        #[command(flatten)]
        remote: ListRemote,
    },
    /// Show an image.
    #[command(after_help = "Example:\n  cloudctl image get hello")]
    Get {
        /// Name or id.
        name: String,
    },
    /// Push an image: a directory (with manifest.json at its root, or an OCI image layout), an OCI archive or a
    /// docker archive, gzipped or not.
    #[command(
        after_help = "Examples:\n  cloudctl image push ./app --name app\n  skopeo copy docker://nginx:1.27 oci-archive:nginx.tar && cloudctl image push nginx.tar\n  docker save app:v1 | gzip > app.tar.gz && cloudctl image push app.tar.gz"
    )]
    Push {
        /// Directory or archive file.
        path: PathBuf,
        /// Image name (default: the directory's name, or the file's up to its first '.').
        #[arg(long, short)]
        name: Option<String>,
    },
    /// Have the platform pull an image from a registry.
    #[command(
        after_help = "Examples:\n  cloudctl image pull 127.0.0.1:5000/team/web:v1\n  cloudctl image pull ghcr.io/org/app@sha256:... --name app\n\nThe platform pulls over https; a plain-http registry must be in the platform's api.insecure_registries."
    )]
    Pull {
        /// `[host[:port]/]repository[:tag][@sha256:...]`; no host means Docker Hub.
        reference: String,
        /// Image name (default: the repository's last component).
        #[arg(long, short)]
        name: Option<String>,
    },
    /// Delete an image.
    #[command(after_help = "Example:\n  cloudctl image delete app", visible_alias = "rm")]
    Delete {
        /// Name or id.
        name: String,
    },
}

pub(crate) async fn run(c: &Client, cmd: &ImageCmd, out: Format) -> anyhow::Result<()> {
    let name_of = |i: &Image| i.name.clone();
    match cmd {
        ImageCmd::List { .. } => crate::list(c, "/v1/images", false, out, output::images, name_of).await?,
        ImageCmd::Get { name } => {
            let i: Image = c.get(&format!("/v1/images/{}", seg(name))).await?;
            print(out, &[i], output::images, name_of, true)?;
        }
        ImageCmd::Push { path, name } => {
            let name = match name {
                Some(n) => n.clone(),
                None => image::name_from_path(path)?,
            };
            let i = image::push(c, &name, image::load(path)?).await?;
            print(out, &[i], output::images, name_of, true)?;
        }
        ImageCmd::Pull { reference, name } => {
            let name = match name {
                Some(n) => n.clone(),
                None => image::name_from_reference(reference)?,
            };
            let i = image::pull(c, &name, reference).await?;
            print(out, &[i], output::images, name_of, true)?;
        }
        ImageCmd::Delete { name } => {
            c.delete(&format!("/v1/images/{}", seg(name))).await?;
            eprintln!("deleted image {name}");
        }
    }
    Ok(())
}
