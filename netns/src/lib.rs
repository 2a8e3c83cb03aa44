//! Everything lhnet knows about interfaces and network namespaces.
// One `unsafe` block: registering the netlink socket with tokio (see `watch::register`).
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod counters;
pub mod discovery;
pub mod namespace;
pub mod network_status;
pub mod topology;
pub mod watch;

pub use counters::{read_device_counters, DeviceCounters};
pub use discovery::{
    discover, interface_addresses, AddressSource, DiscoveryError, Fallback, StorageAddress,
    StorageNetworkSpec,
};
pub use namespace::{enter, run_in, spawn_in};
pub use topology::{Namespace, Topology};
pub use watch::{AddressEvent, AddressWatcher};
