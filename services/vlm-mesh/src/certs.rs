//! `vlm-mesh certs`: a development CA and per-service certificates.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Directory to write ca.pem/ca.key and <role>.pem/.key for gateway, encoder, projector, decoder, client.
    #[arg(long, env = "VLM_CERTS_OUT")]
    pub out: PathBuf,
    /// Extra DNS names or IP addresses for every certificate (comma-separated), e.g. Kubernetes
    /// service names.
    #[arg(long, env = "VLM_CERTS_HOSTS", value_delimiter = ',')]
    pub hosts: Vec<String>,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    vlm_net::certs::generate_dev_certs(&args.out, &args.hosts)?;
    println!(
        "wrote a development CA and certificates to {}",
        args.out.display()
    );
    Ok(())
}
