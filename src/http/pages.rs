//! The browser side: the topic list (`/`), the scoreboard page
//! (`/t/{topic}`), and the scripts `/client.js` and `/embed.js`. (Being built
//! for the browser issue; this stub only reserves the routes.)

use axum::Router;

use super::AppState;

pub(super) fn router() -> Router<AppState> {
    Router::new()
}
