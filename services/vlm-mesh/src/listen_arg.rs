//! Listen addresses on the command line (`--listen`, `--http-listen`, `--health-listen`,
//! `--metrics-listen`): `IP:PORT`, or `localhost:PORT` for the IPv4 loopback; anything else is
//! refused with an example of what works, since a host name other than `localhost` would make
//! the address the service binds depend on the resolver.

use std::net::SocketAddr;

/// Parses one listen address; see the module docs.
pub fn listen_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    if let Some(port) = s.strip_prefix("localhost:") {
        return port
            .parse::<u16>()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
            .map_err(|_| format!("{s:?}: the port must be a number from 0 to 65535"));
    }
    Err(format!(
        "{s:?} is not IP:PORT: give an IP address and a port, e.g. 127.0.0.1:0 (loopback, a free \
         port), localhost:50051, 0.0.0.0:50051 (every IPv4 interface) or [::]:50051 (IPv6)"
    ))
}

#[cfg(test)]
mod tests {
    use super::listen_addr;

    #[test]
    fn ip_addresses_and_localhost_parse_and_host_names_are_refused_with_examples() {
        assert_eq!(
            listen_addr("0.0.0.0:50051").unwrap().to_string(),
            "0.0.0.0:50051"
        );
        assert_eq!(listen_addr("[::1]:7").unwrap().to_string(), "[::1]:7");
        assert_eq!(
            listen_addr("localhost:0").unwrap().to_string(),
            "127.0.0.1:0"
        );
        assert_eq!(listen_addr("localhost:8080").unwrap().port(), 8080);
        let e = listen_addr("localhost:99999").unwrap_err();
        assert!(e.contains("0 to 65535"), "{e}");
        let e = listen_addr("example.com:80").unwrap_err();
        assert!(
            e.contains("\"example.com:80\" is not IP:PORT") && e.contains("127.0.0.1:0"),
            "{e}"
        );
        assert!(listen_addr("50051").is_err());
    }
}
