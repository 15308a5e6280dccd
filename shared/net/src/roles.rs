//! Caller roles: which mesh certificates may call which service.
//!
//! Every certificate the mesh issues names its holder's role in a URI SAN
//! `spiffe://vlm-mesh/<role>` (as SPIFFE IDs do: [`ROLE_URI_PREFIX`]). mTLS alone only proves that
//! a caller holds *some* certificate of the mesh CA; [`CallerRoleLayer`] also checks that the
//! caller's role is one the service accepts ([`AllowedCallers`]), and answers PERMISSION_DENIED
//! otherwise — so a CLI's `client` certificate, or a compromised encoder's, cannot call the
//! decoder directly. `grpc.health.v1.Health` is exempt: health checks and readiness probes come
//! from anyone with a mesh certificate.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready};
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use tower::{Layer, Service};

/// The trust-domain part of a role URI: a certificate's role is what follows it.
pub const ROLE_URI_PREFIX: &str = "spiffe://vlm-mesh/";

/// Longest role name accepted (keeps status messages and logs bounded).
const MAX_ROLE_LEN: usize = 63;

/// Paths no role check applies to.
const EXEMPT_PREFIX: &str = "/grpc.health.v1.Health/";

/// The URI SAN that gives a certificate `role`.
pub fn role_uri(role: &str) -> String {
    format!("{ROLE_URI_PREFIX}{role}")
}

/// Whether `role` is a well-formed role name: 1–63 of `a-z 0-9 - _ .`, as in a SPIFFE path.
pub fn is_valid_role(role: &str) -> bool {
    !role.is_empty()
        && role.len() <= MAX_ROLE_LEN
        && role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

/// The role a DER certificate names in its `spiffe://vlm-mesh/<role>` URI SAN: `Ok(None)` when
/// it has none; an error when it cannot be parsed, or names several roles or a malformed one.
pub fn role_of_certificate(der: &[u8]) -> Result<Option<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unparsable certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("unparsable subjectAltName: {e}"))?;
    let mut role: Option<&str> = None;
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        let x509_parser::extensions::GeneralName::URI(uri) = name else {
            continue;
        };
        let Some(r) = uri.strip_prefix(ROLE_URI_PREFIX) else {
            continue;
        };
        if !is_valid_role(r) {
            return Err("a malformed role URI".into());
        }
        match role {
            Some(seen) if seen != r => return Err("several role URIs".into()),
            _ => role = Some(r),
        }
    }
    Ok(role.map(str::to_string))
}

/// Which caller roles a service accepts (`--allowed-callers`): `any` or a comma-separated list
/// of roles (`gateway`, `gateway,client`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedCallers {
    /// Any caller the transport admits (for TLS servers: any certificate of the mesh CA, or none
    /// where client certificates are optional).
    Any,
    /// Only callers whose certificate names one of these roles.
    Roles(Vec<String>),
}

impl AllowedCallers {
    /// Only the gateway: what the encoder, projector and decoder accept by default.
    pub fn gateway() -> AllowedCallers {
        AllowedCallers::Roles(vec!["gateway".into()])
    }

    pub fn allows(&self, role: Option<&str>) -> bool {
        match self {
            AllowedCallers::Any => true,
            AllowedCallers::Roles(roles) => role.is_some_and(|r| roles.iter().any(|a| a == r)),
        }
    }
}

impl fmt::Display for AllowedCallers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllowedCallers::Any => f.write_str("any"),
            AllowedCallers::Roles(roles) => f.write_str(&roles.join(",")),
        }
    }
}

impl FromStr for AllowedCallers {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("any") {
            return Ok(AllowedCallers::Any);
        }
        let mut roles: Vec<String> = vec![];
        for r in s.split(',').map(str::trim) {
            if r.eq_ignore_ascii_case("any") {
                return Err("`any` cannot be combined with roles".into());
            }
            if !is_valid_role(r) {
                return Err(format!(
                    "{r:?} is not a role: expected `any` or roles such as `gateway,client` \
                     (each 1-{MAX_ROLE_LEN} of a-z 0-9 - _ .)"
                ));
            }
            if !roles.iter().any(|x| x == r) {
                roles.push(r.to_string());
            }
        }
        Ok(AllowedCallers::Roles(roles))
    }
}

/// The role check of the module docs, as a tower layer for a tonic service.
#[derive(Debug, Clone)]
pub struct CallerRoleLayer {
    allowed: Arc<AllowedCallers>,
}

impl CallerRoleLayer {
    pub fn new(allowed: AllowedCallers) -> CallerRoleLayer {
        CallerRoleLayer {
            allowed: Arc::new(allowed),
        }
    }
}

impl<S: NamedService> Layer<S> for CallerRoleLayer {
    type Service = CallerRole<S>;
    fn layer(&self, inner: S) -> CallerRole<S> {
        CallerRole {
            inner,
            allowed: self.allowed.clone(),
        }
    }
}

/// A service wrapped by [`CallerRoleLayer`].
#[derive(Debug, Clone)]
pub struct CallerRole<S> {
    inner: S,
    allowed: Arc<AllowedCallers>,
}

impl<S: NamedService> NamedService for CallerRole<S> {
    const NAME: &'static str = S::NAME;
}

/// What the caller's certificate says about its role.
#[derive(Debug, PartialEq, Eq)]
enum Caller {
    NoCertificate,
    Role(Option<String>),
    Unreadable(String),
}

fn caller_of<B>(req: &Request<B>) -> Caller {
    let certs = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs());
    match certs.as_deref().and_then(|c| c.first()) {
        None => Caller::NoCertificate,
        Some(leaf) => match role_of_certificate(leaf) {
            Ok(role) => Caller::Role(role),
            Err(e) => Caller::Unreadable(e),
        },
    }
}

/// The PERMISSION_DENIED message for `caller` calling `service`, or `None` when it may.
fn refusal(service: &str, allowed: &AllowedCallers, caller: &Caller) -> Option<String> {
    if *allowed == AllowedCallers::Any {
        return None;
    }
    if let Caller::Role(role) = caller {
        if allowed.allows(role.as_deref()) {
            return None;
        }
    }
    let who = match caller {
        Caller::NoCertificate => "the caller presented no client certificate".to_string(),
        Caller::Role(Some(role)) => format!("the caller's certificate has role {role}"),
        Caller::Role(None) => {
            format!("the caller's certificate has no role (no {ROLE_URI_PREFIX}<role> URI SAN)")
        }
        Caller::Unreadable(why) => {
            format!("no role could be read from the caller's certificate ({why})")
        }
    };
    Some(format!(
        "{service} accepts calls only from role {allowed}; {who}"
    ))
}

impl<S, ReqBody> Service<Request<ReqBody>> for CallerRole<S>
where
    S: Service<Request<ReqBody>, Response = Response<Body>> + NamedService,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        if *self.allowed != AllowedCallers::Any && !req.uri().path().starts_with(EXEMPT_PREFIX) {
            if let Some(message) = refusal(S::NAME, &self.allowed, &caller_of(&req)) {
                tracing::warn!(service = S::NAME, %message, "call refused");
                let refused = Status::permission_denied(message).into_http();
                return Either::Left(futures::future::ready(Ok(refused)));
            }
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_callers_parse() {
        assert_eq!("any".parse(), Ok(AllowedCallers::Any));
        assert_eq!(" ANY ".parse(), Ok(AllowedCallers::Any));
        assert_eq!("gateway".parse(), Ok(AllowedCallers::gateway()));
        assert_eq!(
            "gateway, client,gateway".parse(),
            Ok(AllowedCallers::Roles(vec![
                "gateway".into(),
                "client".into()
            ]))
        );
        for bad in [
            "",
            "gateway,",
            "any,gateway",
            "Gateway",
            "spiffe://vlm-mesh/gateway",
        ] {
            assert!(bad.parse::<AllowedCallers>().is_err(), "{bad:?}");
        }
        assert!("x".repeat(64).parse::<AllowedCallers>().is_err());
        let roles: AllowedCallers = "gateway,client".parse().unwrap();
        assert_eq!(roles.to_string(), "gateway,client");
        assert_eq!(roles.to_string().parse(), Ok(roles));
    }

    #[test]
    fn allows_only_listed_roles() {
        let g = AllowedCallers::gateway();
        assert!(g.allows(Some("gateway")));
        assert!(!g.allows(Some("client")));
        assert!(!g.allows(None));
        assert!(AllowedCallers::Any.allows(None));
    }

    #[test]
    fn refusals_name_the_service_the_caller_and_the_roles() {
        let g = AllowedCallers::gateway();
        assert_eq!(
            refusal("vlm.v1.Decoder", &g, &Caller::Role(Some("gateway".into()))),
            None
        );
        let m = refusal("vlm.v1.Decoder", &g, &Caller::Role(Some("client".into()))).unwrap();
        assert_eq!(
            m,
            "vlm.v1.Decoder accepts calls only from role gateway; the caller's certificate has role client"
        );
        let m = refusal("vlm.v1.Decoder", &g, &Caller::Role(None)).unwrap();
        assert!(m.contains("has no role"), "{m}");
        let m = refusal("vlm.v1.Encoder", &g, &Caller::NoCertificate).unwrap();
        assert!(m.contains("no client certificate"), "{m}");
        let m = refusal("vlm.v1.Encoder", &g, &Caller::Unreadable("x".into())).unwrap();
        assert!(m.starts_with("vlm.v1.Encoder accepts"), "{m}");
        assert!(refusal(
            "vlm.v1.Encoder",
            &AllowedCallers::Any,
            &Caller::NoCertificate
        )
        .is_none());
    }

    fn leaf(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        for u in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI((*u).try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_role_comes_from_the_role_uri() {
        assert_eq!(
            role_of_certificate(&leaf(&["spiffe://vlm-mesh/decoder"])),
            Ok(Some("decoder".into()))
        );
        assert_eq!(role_of_certificate(&leaf(&[])), Ok(None));
        // Other trust domains and other URIs give no role.
        assert_eq!(
            role_of_certificate(&leaf(&[
                "spiffe://other/gateway",
                "https://vlm-mesh/gateway"
            ])),
            Ok(None)
        );
        assert!(role_of_certificate(&leaf(&[
            "spiffe://vlm-mesh/gateway",
            "spiffe://vlm-mesh/client"
        ]))
        .is_err());
        assert!(role_of_certificate(&leaf(&["spiffe://vlm-mesh/gate/way"])).is_err());
        assert!(role_of_certificate(b"not a certificate").is_err());
    }

    /// A stand-in service that answers OK (an empty 200) to whatever reaches it.
    #[derive(Clone)]
    struct Ok200;
    impl NamedService for Ok200 {
        const NAME: &'static str = "vlm.v1.Decoder";
    }
    impl Service<Request<()>> for Ok200 {
        type Response = Response<Body>;
        type Error = std::convert::Infallible;
        type Future = Ready<Result<Response<Body>, Self::Error>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Request<()>) -> Self::Future {
            futures::future::ready(Ok(Response::new(Body::empty())))
        }
    }

    async fn status_of(svc: &mut CallerRole<Ok200>, path: &str) -> Option<String> {
        let req = Request::builder().uri(path).body(()).unwrap();
        let resp = svc.call(req).await.unwrap();
        resp.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_string())
    }

    #[tokio::test]
    async fn without_a_certificate_only_health_passes() {
        let mut svc = CallerRoleLayer::new(AllowedCallers::gateway()).layer(Ok200);
        // 7: PERMISSION_DENIED.
        assert_eq!(
            status_of(&mut svc, "/vlm.v1.Decoder/Generate")
                .await
                .as_deref(),
            Some("7")
        );
        assert_eq!(
            status_of(&mut svc, "/grpc.health.v1.Health/Check").await,
            None
        );
        let mut any = CallerRoleLayer::new(AllowedCallers::Any).layer(Ok200);
        assert_eq!(status_of(&mut any, "/vlm.v1.Decoder/Generate").await, None);
    }
}
