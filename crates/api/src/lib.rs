//! weir's HTTP API (v1): a thin face over the engine.
//!
//! Only this crate knows the JSON shapes of requests and responses; it converts
//! them by hand to and from the engine's types. Every error answers with
//! `{"error": {"code", "message", ...}}` and a status that says its kind; the
//! codes are explained in `docs/errors.md`.

mod error;
mod extract;
mod forward;
mod metrics;
mod routes;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use weir_engine::Engine;

pub use error::ApiError;
pub use forward::FORWARDED_HEADER;

/// Limits on what a client may send.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, in bytes; larger ones are refused with 413.
    pub body_size_max: usize,
    /// Largest definition body, in bytes.
    pub definition_size_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            body_size_max: 1024 * 1024,
            definition_size_max: weir_model::dsl::DEFINITION_SIZE_MAX,
        }
    }
}

/// What handlers share.
#[derive(Clone)]
pub(crate) struct AppState {
    pub engine: Engine,
    pub limits: Limits,
    /// Client for forwarding to other nodes.
    pub peers: reqwest::Client,
}

/// The API's router, for serving or for tests.
pub fn router(engine: Engine, limits: Limits) -> axum::Router {
    routes::router(AppState {
        engine,
        limits,
        peers: forward::peer_client(),
    })
}

/// How long in-flight requests may run after the shutdown signal. Polls and
/// instance waits end at once when a node stops, so this bounds only the rare
/// slow request and connections that never become idle (a client that opened
/// a connection and sends nothing keeps hyper's HTTP/1 graceful shutdown
/// waiting); after it the server stops without them, so that the engine can
/// hand its partitions over promptly.
pub const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(5);

/// Serves the API on `listener` until `shutdown` resolves, then lets in-flight
/// requests finish for at most [`SHUTDOWN_DRAIN_MAX`].
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let address: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?address, "API listening");
    let (signalled, signal) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        shutdown.await;
        let _ = signalled.send(());
    };
    // Answers go out at once: without TCP_NODELAY, an answer written in two parts
    // waits for the peer's delayed ACK of the first (up to 40 ms on Linux).
    let listener =
        axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(error = %err, "TCP_NODELAY not set");
            }
        });
    let server = axum::serve(listener, router(engine, limits)).with_graceful_shutdown(shutdown);
    let server = std::future::IntoFuture::into_future(server);
    let drain_expired = async move {
        if signal.await.is_err() {
            // The server ended by itself: the other branch finishes.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(SHUTDOWN_DRAIN_MAX).await;
    };
    tokio::select! {
        result = server => result,
        () = drain_expired => {
            tracing::warn!(
                drain_ms = SHUTDOWN_DRAIN_MAX.as_millis() as u64,
                "connections still open after the shutdown drain; closing them"
            );
            Ok(())
        }
    }
}

/// How long a long poll may be held, at most, when the client asks for more.
pub const POLL_WAIT_MAX: Duration = weir_engine::POLL_WAIT_MAX;
