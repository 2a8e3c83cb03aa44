//! lhnet-proxy: the storage-network sidecar for Longhorn instance-manager and
//! backing-image-manager pods.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod addr;
pub mod address_map;
pub mod admin;
pub mod app;

pub mod body;
pub mod cluster;
pub mod config;
pub mod egress;
pub mod engine_proxy;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod inject;
pub mod listener;
pub mod metrics;
pub mod peer;
pub mod reply;
pub mod route;
pub mod stack;
pub mod storage;
pub mod tcp;
pub mod tls;
