//! Engine and replica addresses as Longhorn writes them: `host:port`, `tcp://host:port`,
//! `http://host:port/v1` (`util.GetGRPCAddress`), parsed once into a socket address.

use std::fmt;
use std::net::SocketAddr;

use tonic::Status;

/// An engine (controller) address from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EngineAddr(pub SocketAddr);

/// A replica's address; its sync agent listens on port + 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReplicaAddr(pub SocketAddr);

/// Parses Longhorn's address forms; `field` names the request field in the error. The text
/// must be exactly an address: no spaces, a port without leading zeros and not 0 (Longhorn
/// writes neither, so either is a wrong or hostile value, not a form to guess at).
pub fn parse_address(field: &str, text: &str) -> Result<SocketAddr, Status> {
    if text.is_empty() {
        return Err(Status::invalid_argument(format!(
            "missing required {field} parameter"
        )));
    }
    let refuse = |why: &str| {
        Status::invalid_argument(format!(
            "{field} {} is not an address{why}; use IP:PORT, tcp://IP:PORT or http://IP:PORT/v1",
            crate::reply::quote_short(text)
        ))
    };
    let rest = text
        .strip_prefix("tcp://")
        .or_else(|| text.strip_prefix("http://"))
        .unwrap_or(text);
    let rest = rest.strip_suffix("/v1").unwrap_or(rest);
    let addr = rest.parse::<SocketAddr>().map_err(|_| refuse(""))?;
    let port_text = rest.rsplit(':').next().unwrap_or("");
    if port_text.starts_with('0') {
        return Err(refuse(" (the port has a leading zero or is 0)"));
    }
    Ok(addr)
}

impl EngineAddr {
    pub fn parse(field: &str, text: &str) -> Result<Self, Status> {
        parse_address(field, text).map(EngineAddr)
    }
}

impl ReplicaAddr {
    pub fn parse(field: &str, text: &str) -> Result<Self, Status> {
        parse_address(field, text).map(ReplicaAddr)
    }

    /// The sync agent of this replica (port + 2, as longhorn-engine lays them out).
    pub fn sync_agent(self) -> Result<SocketAddr, Status> {
        let port = self.0.port().checked_add(2).ok_or_else(|| {
            Status::invalid_argument(format!(
                "replica {} has no room for a sync agent port",
                self.0
            ))
        })?;
        Ok(SocketAddr::new(self.0.ip(), port))
    }

    /// The form the engine reports and the manager sends: `tcp://IP:PORT`.
    pub fn url(self) -> String {
        format!("tcp://{}", self.0)
    }
}

impl fmt::Display for EngineAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for ReplicaAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tcp://{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn accepts_longhorn_forms() {
        for text in [
            "10.30.0.5:10000",
            "tcp://10.30.0.5:10000",
            "http://10.30.0.5:10000/v1",
            "[::1]:9501",
        ] {
            assert!(parse_address("address", text).is_ok(), "{text}");
        }
        let r = ReplicaAddr::parse("replica_address", "tcp://10.30.0.5:10000").unwrap();
        assert_eq!(r.sync_agent().unwrap().to_string(), "10.30.0.5:10002");
        assert_eq!(r.url(), "tcp://10.30.0.5:10000");
    }

    #[test]
    fn refuses_what_is_not_an_address() {
        let e = parse_address("address", "").unwrap_err();
        assert_eq!(
            (e.code(), e.message()),
            (Code::InvalidArgument, "missing required address parameter")
        );
        let e = parse_address("replica_address", "engine-a:10000").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message()
                .contains("replica_address \"engine-a:10000\" is not an address"),
            "{e:?}"
        );
        assert!(parse_address("address", "tcp://10.0.0.1").is_err());
        for text in [
            " 10.0.0.1:9501",
            "10.0.0.1:9501 ",
            "10.0.0.1: 9501",
            "10.0.0.1:09501",
            "10.0.0.1:0",
        ] {
            let e = parse_address("address", text).unwrap_err();
            assert_eq!(e.code(), Code::InvalidArgument, "{text}");
        }
        // A huge value is named by its start and length, so the reply stays small.
        let huge = format!("10.0.0.1:{}", "9".repeat(10_000));
        let e = parse_address("address", &huge).unwrap_err();
        assert!(
            e.message().len() < 200 && e.message().contains("bytes"),
            "{}",
            e.message()
        );
    }
}
