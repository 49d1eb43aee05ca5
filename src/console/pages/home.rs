//! `/console`: where a signed-in person lands.

use axum::response::{IntoResponse, Redirect, Response};

use crate::console::Viewer;

/// The city map is the overview: who is where, and what is live.
pub async fn show(_viewer: Viewer) -> Response {
    Redirect::to("/console/city").into_response()
}
