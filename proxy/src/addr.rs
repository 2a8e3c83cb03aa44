//! The two networks' addresses as types. lhnet maps between a pod's management IP (what the
//! manager knows) and its storage IP (what the data path uses); as distinct types the two
//! cannot be swapped, in a peer entry, a cache, or a lookup's answer.

use std::fmt;
use std::net::IpAddr;

use serde::Serialize;

/// An address on the storage network (`lhnet1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct StorageIp(IpAddr);

/// An address on the management (pod) network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ManagementIp(IpAddr);

/// Another pod, known by both its addresses (`peers:` in the config, or its lhnet's answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub management: ManagementIp,
    pub storage: StorageIp,
}

impl StorageIp {
    pub fn new(ip: IpAddr) -> Self {
        StorageIp(ip)
    }

    pub fn ip(self) -> IpAddr {
        self.0
    }
}

impl ManagementIp {
    pub fn new(ip: IpAddr) -> Self {
        ManagementIp(ip)
    }

    pub fn ip(self) -> IpAddr {
        self.0
    }
}

impl fmt::Display for StorageIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ManagementIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
