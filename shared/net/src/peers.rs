//! Fairness by peer: a [`PeerShare`] bounds how much of one shared limit (pre-admission readers,
//! serving slots and queue places, `Watch` streams) a single peer may hold at once, so that one
//! client — however many connections it opens — can never take all of it.
//!
//! A peer is counted twice: by its **connection** (remote address and port) and by its
//! **identity** — the client certificate's leaf when it presented one (verified against the mesh
//! CA), else its source address (IPv4, or the /64 an IPv6 host sits in, since one host usually
//! owns a whole /64). Both counts are bounded by the same per-peer limit,
//! `ceil(share × total)` (at least 1). Behind a proxy that terminates TLS every client has the
//! proxy's address: give clients certificates, or raise the share (`--max-peer-share 1` turns
//! the per-peer bound off).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

/// Who a call comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The connection's remote address, when known.
    pub connection: Option<SocketAddr>,
    pub identity: PeerIdentity,
}

/// The client a peer is, for shares: its certificate, else its address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// The DER bytes of the client's leaf certificate.
    Certificate(Bytes),
    /// The source address (an IPv6 address with its last 64 bits cleared).
    Address(IpAddr),
    /// Neither is known (an in-process call): no share applies.
    Unknown,
}

impl Peer {
    /// A peer from a connection's address and the client's certificate chain (leaf first).
    pub fn new(connection: Option<SocketAddr>, certs: Option<&[impl AsRef<[u8]>]>) -> Peer {
        let identity = match (certs.and_then(|c| c.first()), connection) {
            (Some(leaf), _) => PeerIdentity::Certificate(Bytes::copy_from_slice(leaf.as_ref())),
            (None, Some(addr)) => PeerIdentity::Address(host_of(addr.ip())),
            (None, None) => PeerIdentity::Unknown,
        };
        Peer {
            connection,
            identity,
        }
    }

    /// The peer of an HTTP request served by tonic (its connect-info extensions).
    pub fn of_http<B>(req: &tonic::codegen::http::Request<B>) -> Peer {
        let ext = req.extensions();
        if let Some(tls) = ext.get::<TlsConnectInfo<TcpConnectInfo>>() {
            let certs = tls.peer_certs();
            return Peer::new(
                tls.get_ref().remote_addr(),
                certs.as_deref().map(|c| &c[..]),
            );
        }
        let addr = ext.get::<TcpConnectInfo>().and_then(|t| t.remote_addr());
        Peer::new(addr, None::<&[&[u8]]>)
    }

    /// The peer of a tonic request.
    pub fn of_grpc<T>(req: &tonic::Request<T>) -> Peer {
        let certs = req.peer_certs();
        Peer::new(req.remote_addr(), certs.as_deref().map(|c| &c[..]))
    }

    /// How errors name the peer (never the certificate's bytes).
    fn describe(&self) -> String {
        match &self.identity {
            PeerIdentity::Certificate(_) => "this client certificate".to_string(),
            PeerIdentity::Address(ip) => format!("address {ip}"),
            PeerIdentity::Unknown => "this peer".to_string(),
        }
    }
}

/// The host part of an address: IPv4 (mapped addresses unwrapped), or an IPv6 /64.
fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Connection(SocketAddr),
    Identity(PeerIdentity),
}

#[derive(Debug)]
struct Inner {
    /// What is shared, for errors ("serving slots and queue places").
    what: &'static str,
    /// The flag that sets the whole limit, for errors.
    flag: &'static str,
    per_peer: usize,
    held: Mutex<HashMap<Key, usize>>,
}

/// One shared limit's per-peer bound. Clones share the counts.
#[derive(Debug, Clone)]
pub struct PeerShare {
    inner: Arc<Inner>,
}

/// A peer's places (one, or `n` units such as bytes) in a [`PeerShare`], given back when
/// dropped.
#[derive(Debug)]
pub struct PeerPermit {
    share: Option<Arc<Inner>>,
    keys: Vec<Key>,
    n: usize,
}

impl PeerPermit {
    /// A permit that holds nothing (no share applies).
    pub fn none() -> PeerPermit {
        PeerPermit {
            share: None,
            keys: vec![],
            n: 0,
        }
    }

    /// Holds `more` units too, or RESOURCE_EXHAUSTED (holding what it held) when that would
    /// take the peer beyond its share. A permit of no share grows freely.
    pub fn try_grow(&mut self, more: usize) -> Result<(), Status> {
        let Some(inner) = &self.share else {
            return Ok(());
        };
        let mut held = inner.held.lock().unwrap_or_else(|p| p.into_inner());
        for key in &self.keys {
            let n = held.get(key).copied().unwrap_or(0);
            if n + more > inner.per_peer {
                return Err(inner.refusal(key_name(key), n));
            }
        }
        for key in &self.keys {
            *held.entry(key.clone()).or_insert(0) += more;
        }
        self.n += more;
        Ok(())
    }

    /// Gives back `less` units (at most what it holds).
    pub fn shrink(&mut self, less: usize) {
        let Some(inner) = &self.share else {
            return;
        };
        let less = less.min(self.n);
        inner.give_back(&self.keys, less);
        self.n -= less;
    }
}

fn key_name(key: &Key) -> String {
    match key {
        Key::Connection(_) => "this connection".to_string(),
        Key::Identity(id) => Peer {
            connection: None,
            identity: id.clone(),
        }
        .describe(),
    }
}

impl Inner {
    fn refusal(&self, whose: String, n: usize) -> Status {
        Status::resource_exhausted(format!(
            "{whose} already holds {n} {}, its share of the {} this server has ({}, \
             --max-peer-share); wait for some to finish",
            self.what, self.what, self.flag
        ))
    }

    fn give_back(&self, keys: &[Key], n: usize) {
        if n == 0 {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            if let Some(have) = held.get_mut(key) {
                *have -= n.min(*have);
                if *have == 0 {
                    held.remove(key);
                }
            }
        }
    }
}

/// The per-peer bound of a limit of `total` at `share`: `ceil(share × total)`, at least 1;
/// unbounded (`usize::MAX`) at a share of 1 or more, which turns the bound off.
pub fn per_peer_limit(total: usize, share: f64) -> usize {
    if share >= 1.0 {
        return usize::MAX;
    }
    let n = (share.max(0.0) * total as f64).ceil() as usize;
    n.clamp(1, total.max(1))
}

impl PeerShare {
    /// At most [`per_peer_limit`]`(total, share)` of `what` (a limit of `total`, set by `flag`)
    /// per peer.
    pub fn new(what: &'static str, flag: &'static str, total: usize, share: f64) -> PeerShare {
        PeerShare {
            inner: Arc::new(Inner {
                what,
                flag,
                per_peer: per_peer_limit(total, share),
                held: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The most one peer may hold.
    pub fn per_peer(&self) -> usize {
        self.inner.per_peer
    }

    /// A place for `peer`, or RESOURCE_EXHAUSTED when its connection or identity already holds
    /// its share. An unknown peer (in-process) takes no place.
    pub fn take(&self, peer: &Peer) -> Result<PeerPermit, Status> {
        let mut permit = self.empty(peer);
        permit.try_grow(1)?;
        Ok(permit)
    }

    /// A permit of `peer` holding nothing yet, to grow by units ([`PeerPermit::try_grow`]).
    pub fn empty(&self, peer: &Peer) -> PeerPermit {
        let mut keys = Vec::with_capacity(2);
        if let Some(c) = peer.connection {
            keys.push(Key::Connection(c));
        }
        if peer.identity != PeerIdentity::Unknown {
            keys.push(Key::Identity(peer.identity.clone()));
        }
        if keys.is_empty() || self.inner.per_peer == usize::MAX {
            return PeerPermit::none();
        }
        PeerPermit {
            share: Some(self.inner.clone()),
            keys,
            n: 0,
        }
    }

    /// Places held now by all peers together (for tests and metrics).
    pub fn held(&self) -> usize {
        let held = self.inner.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter()
            .filter(|(k, _)| matches!(k, Key::Identity(_)))
            .map(|(_, n)| n)
            .sum()
    }
}

impl Drop for PeerPermit {
    fn drop(&mut self) {
        if let Some(inner) = self.share.take() {
            inner.give_back(&self.keys, self.n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(addr: &str) -> Peer {
        Peer::new(Some(addr.parse().unwrap()), None::<&[&[u8]]>)
    }

    #[test]
    fn the_limit_is_a_share_rounded_up() {
        assert_eq!(per_peer_limit(128, 0.25), 32);
        assert_eq!(per_peer_limit(6, 0.25), 2);
        assert_eq!(per_peer_limit(2, 0.25), 1);
        assert_eq!(per_peer_limit(0, 0.25), 1);
        assert_eq!(per_peer_limit(10, 0.99), 10);
        assert_eq!(per_peer_limit(10, 1.0), usize::MAX);
        assert_eq!(per_peer_limit(10, 7.0), usize::MAX);
    }

    /// Two connections of one address share the address's places; another address has its own.
    #[test]
    fn connections_of_one_address_share_its_places() {
        let share = PeerShare::new("slots", "--max-in-flight", 8, 0.25);
        let a = share.take(&at("10.0.0.1:1000")).unwrap();
        let b = share.take(&at("10.0.0.1:2000")).unwrap();
        let refused = share.take(&at("10.0.0.1:3000")).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused
                .message()
                .contains("address 10.0.0.1 already holds 2 slots"),
            "{}",
            refused.message()
        );
        assert!(refused.message().contains("--max-peer-share"));
        let _other = share.take(&at("10.0.0.2:1000")).unwrap();
        drop(a);
        let _again = share.take(&at("10.0.0.1:3000")).unwrap();
        drop(b);
        assert_eq!(share.held(), 2);
    }

    /// A certificate is one identity whatever address it connects from; a connection alone is
    /// bounded too.
    #[test]
    fn certificates_are_identities_and_connections_are_bounded() {
        let share = PeerShare::new("streams", "--max-watch-streams", 4, 0.5);
        let cert = [b"leaf".to_vec()];
        let from = |addr: &str| Peer::new(Some(addr.parse().unwrap()), Some(&cert[..]));
        let _a = share.take(&from("10.0.0.1:1")).unwrap();
        let _b = share.take(&from("10.0.0.2:1")).unwrap();
        let e = share.take(&from("10.0.0.3:1")).unwrap_err();
        assert!(e.message().contains("this client certificate"), "{e:?}");
        // Without the certificate, the same addresses are other identities.
        let _c = share.take(&at("10.0.0.1:2")).unwrap();
        let _d = share.take(&at("10.0.0.1:3")).unwrap();
        let e = share.take(&at("10.0.0.1:3")).unwrap_err();
        assert!(e.message().contains("10.0.0.1"), "{e:?}");
    }

    #[test]
    fn ipv6_hosts_are_their_64_and_mapped_addresses_are_ipv4() {
        assert_eq!(
            host_of("2001:db8:1:2:aaaa::1".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            host_of("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        let share = PeerShare::new("slots", "--max-in-flight", 4, 0.25);
        let _a = share.take(&at("[2001:db8::1]:1")).unwrap();
        assert!(share.take(&at("[2001:db8::2]:1")).is_err());
    }

    /// Units (bytes): a peer's permits together stay within its share; shrinking gives back.
    #[test]
    fn units_grow_within_the_share_and_shrink() {
        let share = PeerShare::new("bytes of request data", "--max-bytes-in-flight", 1000, 0.25);
        let peer = at("10.0.0.9:1");
        let mut a = share.empty(&peer);
        a.try_grow(200).unwrap();
        let mut b = share.empty(&at("10.0.0.9:2"));
        let e = b.try_grow(51).unwrap_err();
        assert!(e.message().contains("already holds 200 bytes"), "{e:?}");
        b.try_grow(50).unwrap();
        a.shrink(100);
        b.try_grow(100).unwrap();
        drop((a, b));
        assert_eq!(share.held(), 0);
    }

    #[test]
    fn unknown_peers_take_no_place() {
        let share = PeerShare::new("slots", "--max-in-flight", 1, 0.25);
        let unknown = Peer::new(None, None::<&[&[u8]]>);
        let _a = share.take(&unknown).unwrap();
        let _b = share.take(&unknown).unwrap();
        assert_eq!(share.held(), 0);
    }
}
