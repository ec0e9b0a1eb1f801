//! spillway: a live-state server. Publishers push the current state of a
//! topic; readers get the newest state, and a reader who cannot keep up costs
//! the server one pointer. `ARCHITECTURE.md` is the map of this crate.

pub mod admission;
pub mod app;
pub mod bus;
pub mod config;
pub mod demo;
pub mod http;
pub mod ingest;
pub mod memory;
pub mod metrics;
pub mod net;
pub mod protocol;
pub mod server;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod topic;

pub use app::Application;
