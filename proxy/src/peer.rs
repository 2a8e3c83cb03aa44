//! `lhnet.v1.Peer` (`local: peer`): tells other lhnets this pod's storage and management
//! addresses, and asks theirs. This is how a manager that knows only management IPs gets its
//! calls to the right storage address (see `address_map`).

use std::net::SocketAddr;

use crate::addr::{ManagementIp, StorageIp};
use std::sync::Arc;
use std::time::Duration;

use lhnet_proto::peer::peer_client::PeerClient;
use lhnet_proto::peer::peer_server::{Peer, PeerServer};
use lhnet_proto::peer::{StorageAddressRequest, StorageAddressResponse};
use tonic::transport::Endpoint;

use crate::tls::ClientTls;
use tonic::{Request, Response, Status};

use crate::storage::StorageState;

#[derive(Clone)]
pub struct PeerService {
    storage: Arc<StorageState>,
}

impl PeerService {
    pub fn server(storage: Arc<StorageState>) -> PeerServer<PeerService> {
        PeerServer::new(PeerService { storage })
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn storage_address(
        &self,
        _request: Request<StorageAddressRequest>,
    ) -> Result<Response<StorageAddressResponse>, Status> {
        let current = self.storage.current().ok_or_else(|| {
            Status::unavailable(format!(
                "this pod has no storage address yet: {}",
                self.storage.last_error().unwrap_or_default()
            ))
        })?;
        Ok(Response::new(StorageAddressResponse {
            storage_address: current.ip.to_string(),
            management_address: self
                .storage
                .own_management_address()
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
            source: current.source.as_str().to_string(),
        }))
    }
}

/// A peer's answer, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddresses {
    pub storage: StorageIp,
    pub management: Option<ManagementIp>,
}

/// Why a peer lhnet did not tell its addresses.
#[derive(Debug, thiserror::Error)]
pub enum PeerLookupError {
    #[error("{addr} is not a usable peer address: {cause}")]
    BadAddress { addr: SocketAddr, cause: String },
    #[error("connecting to {addr}: {cause}")]
    Connect { addr: SocketAddr, cause: String },
    #[error("{addr} answered {code:?}: {message}")]
    Refused {
        addr: SocketAddr,
        code: tonic::Code,
        message: String,
    },
    #[error("{addr} answered a storage address that is not an IP: {answer:?}")]
    NotAnIp { addr: SocketAddr, answer: String },
    #[error("no answer from {addr} within {}", crate::config::format_duration(*timeout))]
    Timeout { addr: SocketAddr, timeout: Duration },
}

/// Asks the lhnet at `addr` for its pod's addresses; the whole exchange (connect included)
/// gets `timeout`.
pub async fn ask(
    addr: SocketAddr,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<PeerAddresses, PeerLookupError> {
    let exchange = async {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| PeerLookupError::BadAddress {
                addr,
                cause: e.to_string(),
            })?
            .connect_timeout(timeout);
        let tls = match tls {
            Some(t) => t
                .for_dial("peer_lookup")
                .map_err(|cause| PeerLookupError::Connect { addr, cause })?
                .map(|config| (config, t.config.peer_name.clone())),
            None => None,
        };
        let connected = match tls {
            Some((config, name)) => {
                endpoint
                    .connect_with_connector(crate::tls::connector(addr, config, name))
                    .await
            }
            None => endpoint.connect().await,
        };
        let channel = connected.map_err(|e| PeerLookupError::Connect {
            addr,
            cause: crate::cluster::error_chain(&e),
        })?;
        let reply = PeerClient::new(channel)
            .storage_address(StorageAddressRequest {})
            .await
            .map_err(|s| PeerLookupError::Refused {
                addr,
                code: s.code(),
                message: s.message().to_string(),
            })?
            .into_inner();
        let storage = reply
            .storage_address
            .parse()
            .map_err(|_| PeerLookupError::NotAnIp {
                addr,
                answer: reply.storage_address.clone(),
            })?;
        Ok(PeerAddresses {
            storage: StorageIp::new(storage),
            management: reply.management_address.parse().ok().map(ManagementIp::new),
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(PeerLookupError::Timeout { addr, timeout }),
    }
}
