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
    /// Replace an existing CA and every key in --out. Whatever runs with the old certificates
    /// (a mesh started by `up`, pods using them) stops trusting and being trusted.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let existing: Vec<String> = std::fs::read_dir(&args.out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".pem") || n.ends_with(".key"))
        .collect();
    if !existing.is_empty() && !args.force {
        anyhow::bail!(
            "{} already holds certificates or keys ({}); replacing them breaks every process \
             that uses them (a running mesh stops trusting its peers). Pass --force to replace \
             them, or choose another --out",
            args.out.display(),
            existing.join(", ")
        );
    }
    vlm_net::certs::generate_dev_certs(&args.out, &args.hosts)?;
    println!(
        "wrote a development CA and certificates to {}",
        args.out.display()
    );
    Ok(())
}
