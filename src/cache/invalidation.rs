//! Changes made on one instance, told to every other: one Redis pub/sub channel, one subscriber
//! per process, and a [`Listener`] per module that owns what its messages are about.
//!
//! A message is `<topic>:<payload>` (or just `<topic>`). Each module registers its listener in
//! [`crate::app`]: the topics it owns, the function that applies a message, and the function that
//! catches up from Postgres. Catching up runs on every (re)connection, because messages sent while
//! this instance was not listening are lost; until it has run, modules must not trust their caches
//! (see [`Listener::disconnected`]).

use std::{future::Future, pin::Pin, time::Duration};

use futures_util::StreamExt;

use crate::{redis::Redis, state::AppState};

/// A boxed future, for the function pointers in [`Listener`].
pub type Task<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What one module listens for.
pub struct Listener {
    /// The message prefixes (before the first `:`, or the whole message) this module owns.
    pub topics: &'static [&'static str],
    /// Applies a message: its topic and its payload (empty when the message has none).
    pub apply: for<'a> fn(&'a AppState, &'a str, &'a str) -> Task<'a, ()>,
    /// Catches up from Postgres after each (re)connection.
    pub resync: for<'a> fn(&'a AppState) -> Task<'a, anyhow::Result<()>>,
    /// Runs when the subscriber loses its connection: drop what may go stale unnoticed.
    pub disconnected: fn(&AppState),
}

fn channel(redis: &Redis) -> String {
    redis.key("auth:invalidate")
}

/// Tells every instance (this one included) about a change: `topic` and its payload. A failure is
/// logged, not returned: the change is committed in Postgres, and instances catch up from there.
pub async fn publish(redis: &Redis, topic: &str, payload: &str) {
    let message = if payload.is_empty() { topic.to_owned() } else { format!("{topic}:{payload}") };
    let send = async {
        let mut conn = redis.conn().await?;
        let _: i64 = tokio::time::timeout(
            redis.timeout(),
            deadpool_redis::redis::cmd("PUBLISH").arg(channel(redis)).arg(&message).query_async(&mut *conn),
        )
        .await??;
        anyhow::Ok(())
    };
    if let Err(e) = send.await {
        tracing::warn!(error = %e, topic, "could not publish a change to other instances; they catch up from Postgres");
    }
}

/// Runs `apply` of the module that owns a message's topic; unknown topics are ignored (a newer
/// instance's).
async fn dispatch(state: &AppState, listeners: &[Listener], message: &str) {
    let (topic, payload) = message.split_once(':').unwrap_or((message, ""));
    if let Some(l) = listeners.iter().find(|l| l.topics.contains(&topic)) {
        (l.apply)(state, topic, payload).await;
    }
}

/// Listens until the process ends, reconnecting as needed. Each connection first subscribes, then
/// catches every module up, so that nothing published after the catch-up read can be missed.
pub async fn run(state: AppState, listeners: Vec<Listener>) {
    let channel = channel(state.redis());
    let url = state.config().redis.url.clone();
    loop {
        let session = async {
            let client = deadpool_redis::redis::Client::open(url.as_str())?;
            let mut pubsub = tokio::time::timeout(Duration::from_secs(3), client.get_async_pubsub()).await??;
            pubsub.subscribe(&channel).await?;
            for l in &listeners {
                (l.resync)(&state).await?;
            }
            let mut stream = pubsub.on_message();
            while let Some(msg) = stream.next().await {
                if let Ok(text) = msg.get_payload::<String>() {
                    dispatch(&state, &listeners, &text).await;
                }
            }
            anyhow::Ok(())
        };
        if let Err(e) = session.await {
            tracing::debug!(error = %e, "change subscriber disconnected");
        }
        for l in &listeners {
            (l.disconnected)(&state);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
