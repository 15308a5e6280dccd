//! Development PKI: one CA and a leaf per mesh role, generated with rcgen.
//! Production certificates come from elsewhere (a Kubernetes Secret,
//! cert-manager) in the same file layout.
//!
//! Every leaf names its role in a URI SAN `spiffe://vlm-mesh/<role>`
//! ([`crate::roles`]), which servers check against `--allowed-callers`.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::roles::{role_of_certificate, role_uri};
use crate::{NetError, TlsPems};

/// Leaf certificates generated for the dev mesh. Services are also clients
/// of each other, so every leaf is valid for both server and client auth;
/// `client` is for CLI tools and tests.
pub const ROLES: [&str; 5] = ["gateway", "encoder", "projector", "decoder", "client"];

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";

/// Days a leaf is valid by default (`vlm-mesh certs --days`), as cert-manager's default duration.
pub const DEFAULT_LEAF_DAYS: u32 = 90;
/// Days the development CA is valid: ten years, so leaves can be reissued from it many times.
pub const CA_DAYS: u32 = 3650;
/// `ensure_dev_certs` reissues a leaf that expires within this many days.
const REISSUE_WITHIN_DAYS: i64 = 7;

/// A generated PKI, in memory.
#[derive(Clone)]
pub struct DevPki {
    pub ca_cert_pem: String,
    pub ca_key_pem: String,
    pub leaves: Vec<LeafPems>,
}

/// One role's certificate and key.
#[derive(Clone)]
pub struct LeafPems {
    pub role: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for DevPki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let roles: Vec<&str> = self.leaves.iter().map(|l| l.role.as_str()).collect();
        f.debug_struct("DevPki")
            .field("roles", &roles)
            .finish_non_exhaustive()
    }
}

impl DevPki {
    /// The TLS material for `role`, trusting this PKI's CA.
    pub fn tls_pems(&self, role: &str) -> Option<TlsPems> {
        self.leaves
            .iter()
            .find(|l| l.role == role)
            .map(|l| TlsPems {
                ca: self.ca_cert_pem.clone().into_bytes(),
                cert: l.cert_pem.clone().into_bytes(),
                key: l.key_pem.clone().into_bytes(),
            })
    }

    /// Writes `ca.pem`, `ca.key` and `{role}.pem`/`{role}.key` into `dir`
    /// (created if needed), keys with mode 0600.
    pub fn write_to(&self, dir: &Path) -> Result<(), NetError> {
        std::fs::create_dir_all(dir).map_err(|source| NetError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        write_file(&dir.join(CA_KEY), &self.ca_key_pem, true)?;
        write_file(&dir.join(CA_CERT), &self.ca_cert_pem, false)?;
        for leaf in &self.leaves {
            write_leaf(dir, leaf)?;
        }
        Ok(())
    }
}

/// Generates a fresh CA and a leaf for every role in [`ROLES`], in memory, leaves valid for
/// [`DEFAULT_LEAF_DAYS`]. See [`generate_dev_pki_for`].
pub fn generate_dev_pki(extra_hosts: &[String]) -> Result<DevPki, NetError> {
    generate_dev_pki_for(extra_hosts, DEFAULT_LEAF_DAYS)
}

/// Generates a fresh CA (valid [`CA_DAYS`]) and a leaf for every role in [`ROLES`] (valid
/// `leaf_days`), in memory. Leaf SANs: localhost, 127.0.0.1, ::1, the role name, the role URI
/// `spiffe://vlm-mesh/<role>`, and the `extra_hosts` for that role: an entry `NAME` (a DNS name
/// or IP address) goes into every leaf, `ROLE=NAME` only into that role's (e.g.
/// `encoder=vlm-mesh-encoder.ml.svc`), so a leaf names only its own service.
pub fn generate_dev_pki_for(extra_hosts: &[String], leaf_days: u32) -> Result<DevPki, NetError> {
    let hosts = parse_hosts(extra_hosts)?;
    let ca_key = KeyPair::generate().map_err(|source| NetError::CertGen {
        what: "CA key".into(),
        source,
    })?;
    let mut ca = ca_params(&ca_key);
    set_validity(&mut ca, CA_DAYS);
    let ca_cert = ca
        .self_signed(&ca_key)
        .map_err(|source| NetError::CertGen {
            what: "CA certificate".into(),
            source,
        })?;
    let issuer = Issuer::new(ca_params(&ca_key), &ca_key);
    let leaves = ROLES
        .iter()
        .map(|role| issue_leaf(role, &hosts.of(role), leaf_days, &issuer))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DevPki {
        ca_cert_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        leaves,
    })
}

/// Generates a new PKI into `out_dir`, replacing any files already there.
pub fn generate_dev_certs(
    out_dir: impl AsRef<Path>,
    extra_hosts: &[String],
) -> Result<(), NetError> {
    generate_dev_pki(extra_hosts)?.write_to(out_dir.as_ref())
}

/// `--hosts` entries, split into names for every leaf and names for one role's.
#[derive(Debug, Default)]
struct Hosts {
    every: Vec<String>,
    by_role: Vec<(String, String)>,
}

impl Hosts {
    fn of(&self, role: &str) -> Vec<String> {
        let own = self.by_role.iter().filter(|(r, _)| r == role);
        self.every
            .iter()
            .cloned()
            .chain(own.map(|(_, h)| h.clone()))
            .collect()
    }
}

fn parse_hosts(entries: &[String]) -> Result<Hosts, NetError> {
    let mut hosts = Hosts::default();
    for entry in entries {
        let (role, name) = match entry.split_once('=') {
            Some((role, name)) => (Some(role.trim()), name.trim()),
            None => (None, entry.trim()),
        };
        // rcgen accepts any ASCII; check with the same parser clients use to verify names, so
        // every SAN written is one a client can ask for.
        rustls_pki_types::ServerName::try_from(name).map_err(|e| NetError::InvalidHost {
            host: entry.clone(),
            reason: e.to_string(),
        })?;
        match role {
            None => hosts.every.push(name.to_string()),
            Some(r) if ROLES.contains(&r) => hosts.by_role.push((r.into(), name.into())),
            Some(r) => {
                return Err(NetError::InvalidHost {
                    host: entry.clone(),
                    reason: format!("{r:?} is not a role (one of {})", ROLES.join(", ")),
                })
            }
        }
    }
    Ok(hosts)
}

/// Valid from an hour ago (clocks of peers differ a little) for `days`.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
}

/// The DNS names and IP addresses a certificate (DER) is valid for, as strings.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let Some(san) = cert.subject_alternative_name().map_err(|e| e.to_string())? else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(d.to_string()),
            GeneralName::IPAddress(ip) => match ip.len() {
                4 => Some(std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string()),
                16 => Some(std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// Makes sure `dir` holds a complete dev PKI; returns whether anything was
/// written. Without a CA, generates everything. With one, issues only the
/// missing leaves from the existing CA, so certificates already handed to
/// running processes stay valid. Existing leaves are not rewritten, so
/// `extra_hosts` only affects newly issued ones — except leaves that do not
/// carry their role URI (made before certificates had roles): servers would
/// refuse them, so they are reissued from the same CA (and logged).
///
/// Reissuing needs `ca.key` and assumes `ca.pem` was made by this module;
/// a foreign CA key is detected and refused.
pub fn ensure_dev_certs(dir: impl AsRef<Path>, extra_hosts: &[String]) -> Result<bool, NetError> {
    let dir = dir.as_ref();
    let missing: Vec<&str> = ROLES
        .iter()
        .copied()
        .filter(|r| !leaf_paths(dir, r).iter().all(|p| p.exists()))
        .collect();
    let ca_cert_path = dir.join(CA_CERT);
    if !ca_cert_path.exists() {
        generate_dev_certs(dir, extra_hosts)?;
        return Ok(true);
    }
    let without_role: Vec<&str> = ROLES
        .iter()
        .copied()
        .filter(|r| !missing.contains(r) && leaf_lacks_role(dir, r))
        .collect();
    if !without_role.is_empty() {
        tracing::warn!(
            dir = %dir.display(),
            roles = ?without_role,
            "reissuing dev certificates made before roles (no spiffe://vlm-mesh/<role> URI SAN) from the existing CA"
        );
    }
    let expiring: Vec<&str> = ROLES
        .iter()
        .copied()
        .filter(|r| !missing.contains(r) && !without_role.contains(r) && leaf_expiring(dir, r))
        .collect();
    if !expiring.is_empty() {
        tracing::warn!(dir = %dir.display(), roles = ?expiring,
            "reissuing dev certificates that expire within {REISSUE_WITHIN_DAYS} days from the existing CA");
    }
    let missing: Vec<&str> = missing
        .into_iter()
        .chain(without_role)
        .chain(expiring)
        .collect();
    if missing.is_empty() {
        return Ok(false);
    }
    let dev_err = |reason: String| NetError::DevCerts {
        dir: dir.to_path_buf(),
        reason,
    };
    let ca_key_path = dir.join(CA_KEY);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(|e| {
        dev_err(format!(
            "cannot issue certificates for {missing:?}: reading {} failed ({e}); remove the directory to start over",
            ca_key_path.display()
        ))
    })?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| {
        dev_err(format!(
            "{} is not a usable key: {e}",
            ca_key_path.display()
        ))
    })?;
    let ca_cert_pem = std::fs::read(&ca_cert_path).map_err(|source| NetError::Read {
        what: "CA certificate",
        path: ca_cert_path.clone(),
        source,
    })?;
    if !ca_pem_holds_key(&ca_cert_pem, &ca_key) {
        return Err(dev_err(format!(
            "{} does not match {}; remove the directory to start over",
            ca_key_path.display(),
            ca_cert_path.display()
        )));
    }
    let issuer = Issuer::new(ca_params(&ca_key), &ca_key);
    let hosts = parse_hosts(extra_hosts)?;
    for role in missing {
        write_leaf(
            dir,
            &issue_leaf(role, &hosts.of(role), DEFAULT_LEAF_DAYS, &issuer)?,
        )?;
    }
    Ok(true)
}

/// The CA's parameters, derived from its key alone so an issuer can be
/// rebuilt from `ca.key` (the subject DN must match what `ca.pem` says). The
/// key fingerprint in the name keeps separate dev CAs distinct: peers with
/// the wrong CA then fail as "unknown issuer" instead of a confusing
/// signature error from a same-named CA.
fn ca_params(ca_key: &KeyPair) -> CertificateParams {
    let tag: String = ca_key
        .public_key_raw()
        .iter()
        .rev()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "vlm-mesh");
    dn.push(DnType::CommonName, format!("vlm-mesh development CA {tag}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// A leaf for `role` valid for `days`, named `hosts` (checked by [`parse_hosts`]) besides the
/// loopback names and the role.
fn issue_leaf(
    role: &str,
    hosts: &[String],
    days: u32,
    issuer: &Issuer<'_, &KeyPair>,
) -> Result<LeafPems, NetError> {
    let mut sans: Vec<String> = ["localhost", "127.0.0.1", "::1", role]
        .map(String::from)
        .to_vec();
    for h in hosts {
        if !sans.contains(h) {
            sans.push(h.clone());
        }
    }
    let gen_err = |source| NetError::CertGen {
        what: format!("{role} (names {sans:?})"),
        source,
    };
    let mut params = CertificateParams::new(sans.clone()).map_err(gen_err)?;
    let uri = role_uri(role).try_into().map_err(gen_err)?;
    params.subject_alt_names.push(SanType::URI(uri));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "vlm-mesh");
    dn.push(DnType::CommonName, role);
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, days);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = params.signed_by(&key, issuer).map_err(gen_err)?;
    Ok(LeafPems {
        role: role.to_string(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

fn leaf_paths(dir: &Path, role: &str) -> [PathBuf; 2] {
    [
        dir.join(format!("{role}.pem")),
        dir.join(format!("{role}.key")),
    ]
}

/// Whether `role`'s leaf in `dir` parses but does not carry the URI of `role`. A leaf that cannot
/// be read is left alone: loading it reports a clearer error than a silent reissue would.
fn leaf_lacks_role(dir: &Path, role: &str) -> bool {
    use rustls_pki_types::pem::PemObject;
    let [cert, _] = leaf_paths(dir, role);
    let Ok(der) = rustls_pki_types::CertificateDer::from_pem_file(&cert) else {
        return false;
    };
    match role_of_certificate(&der) {
        Ok(found) => found.as_deref() != Some(role),
        Err(_) => false,
    }
}

/// Whether `role`'s leaf in `dir` expires within [`REISSUE_WITHIN_DAYS`] (or has expired).
fn leaf_expiring(dir: &Path, role: &str) -> bool {
    use rustls_pki_types::pem::PemObject;
    let [cert, _] = leaf_paths(dir, role);
    let Ok(der) = rustls_pki_types::CertificateDer::from_pem_file(&cert) else {
        return false;
    };
    let Ok((not_after, _)) = crate::tls_source::leaf_facts(&der) else {
        return false;
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    not_after < now + REISSUE_WITHIN_DAYS * 86_400
}

fn write_leaf(dir: &Path, leaf: &LeafPems) -> Result<(), NetError> {
    let [cert, key] = leaf_paths(dir, &leaf.role);
    write_file(&key, &leaf.key_pem, true)?;
    write_file(&cert, &leaf.cert_pem, false)
}

/// Whether the certificate's DER contains the key's raw public key — true
/// exactly when the SubjectPublicKeyInfo is that key's (enough to catch a
/// foreign CA without an X.509 parser).
fn ca_pem_holds_key(cert_pem: &[u8], key: &KeyPair) -> bool {
    use rustls_pki_types::pem::PemObject;
    let Ok(der) = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem) else {
        return false;
    };
    let pk = key.public_key_raw();
    !pk.is_empty() && der.windows(pk.len()).any(|w| w == pk)
}

/// Makes sure `path` holds a random secret (32 bytes from the OS, hex), created 0600 when
/// missing and kept otherwise (so every process of a mesh, and its restarts, share it). True
/// when it was created.
pub fn ensure_secret_file(path: &Path) -> Result<bool, NetError> {
    if path.exists() {
        return Ok(false);
    }
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|source| NetError::Write {
            path: path.to_path_buf(),
            source,
        })?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_file(path, &hex, true)?;
    Ok(true)
}

/// Writes via a temporary file and rename, so a concurrent reader sees the
/// old file or the new one, never half of one; keys are created 0600 so they
/// are never readable by others, not even briefly.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), NetError> {
    let werr = |source| NetError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = opts.open(&tmp).map_err(werr)?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(werr)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(werr)
}
