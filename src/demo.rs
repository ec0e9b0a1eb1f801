//! Demo mode (`--demo`): a simulated live match published on topic `demo`
//! through the same store and hub as any publisher. (Being built for the
//! browser issue; this stub does nothing yet.)

use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::topic::Hub;

/// Runs the simulated match until `shutdown` fires.
pub async fn run(store: Store, hub: Hub, shutdown: CancellationToken) {
    let _ = (store, hub);
    shutdown.cancelled().await;
}
