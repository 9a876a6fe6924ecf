//! `cloudctl whoami`: the current remote's tenant and token.

use cloud_domain::api::WhoAmI;

use crate::client::Client;
use crate::output::{self, Format};

pub(crate) async fn run(c: &Client, out: Format) -> anyhow::Result<()> {
    let me: WhoAmI = c.get("/v1/whoami").await?;
    match out {
        Format::Json => println!("{}", serde_json::to_string_pretty(&me)?),
        Format::Yaml => print!("{}", output::yaml(&me)?),
        Format::Name => println!("{}", me.tenant.name),
        Format::Value(path) => output::values(&[&me], path)?,
        Format::Table => {
            let scopes: Vec<&str> = me.scopes.iter().map(|s| s.as_str()).collect();
            println!("tenant: {}  network: {}", me.tenant.name, me.tenant.network);
            println!("token:  {}  scopes: {}  expires: {}", me.token_id, scopes.join(","), me.expires_at);
        }
    }
    Ok(())
}
