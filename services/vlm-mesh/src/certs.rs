//! `vlm-mesh certs`: a development CA and per-service certificates.

use std::path::PathBuf;

use clap::Args;

#[derive(Args, Debug)]
pub struct CertsArgs {
    /// Directory to write ca.pem/ca.key and <role>.pem/.key for gateway, encoder, projector, decoder, client.
    #[arg(long, env = "VLM_CERTS_OUT")]
    pub out: PathBuf,
    /// Extra DNS names or IP addresses (comma-separated): `NAME` goes into every certificate,
    /// `ROLE=NAME` only into that role's (e.g. `encoder=vlm-mesh-encoder.ml.svc`), so each
    /// service's certificate names only that service. Every certificate also carries localhost,
    /// 127.0.0.1, ::1, its role's name and its role URI `spiffe://vlm-mesh/<role>`.
    #[arg(long, env = "VLM_CERTS_HOSTS", value_delimiter = ',')]
    pub hosts: Vec<String>,
    /// Days the service and client certificates are valid (the CA: ten years, so that new
    /// certificates can be issued from it).
    #[arg(long, env = "VLM_CERTS_DAYS", default_value_t = vlm_net::certs::DEFAULT_LEAF_DAYS,
        value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
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
    vlm_net::certs::generate_dev_pki_for(&args.hosts, args.days)?.write_to(&args.out)?;
    println!(
        "wrote a development CA and certificates valid for {} days to {}",
        args.days,
        args.out.display()
    );
    Ok(())
}
