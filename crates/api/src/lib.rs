//! converge's REST API: the axum routes, the node services each handler calls once, the
//! typed client every CLI command uses, the HTTPS transport between nodes, and the node's
//! two TCP doors (`listen`).
//!
//! Handlers parse, make one call and map the error to a status; what a call does lives in
//! `NodeServices`.

mod auth;
mod cidata;
pub mod client;
mod error;
mod listen;
mod networks;
mod node_host;
mod routes;
mod services;
mod transport;
pub mod v1;
mod vms;

pub use auth::{required, Access};
pub use error::ApiError;
pub use listen::{serve_api, serve_node_port, ApiLimits};
pub use node_host::NodeHost;
pub use routes::{local_router, peer_router, router};
pub use services::NodeServices;
pub use transport::HttpTransport;
pub use vms::boot_volume_bytes;
