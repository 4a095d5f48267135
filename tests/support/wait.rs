//! The one bounded poll, for effects that have no event to await (a TTL
//! lapsing, a lease released asynchronously, the clock passing a second).
//! Where there is an event, await the event instead.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

/// How long [`eventually`] waits between two checks.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// What a check of [`eventually`] answers: `true` or `Ok(value)` when the
/// awaited thing holds; `false` or `Err(what was seen)` when not yet.
pub trait Check {
    type Value;
    fn outcome(self) -> Result<Self::Value, Option<String>>;
}

impl Check for bool {
    type Value = ();
    fn outcome(self) -> Result<(), Option<String>> {
        if self { Ok(()) } else { Err(None) }
    }
}

impl<T, E: Debug> Check for Result<T, E> {
    type Value = T;
    fn outcome(self) -> Result<T, Option<String>> {
        self.map_err(|seen| Some(format!("{seen:?}")))
    }
}

/// Runs `check` until it holds and returns its value; panics naming `what`
/// (and what the last check saw) if it does not hold within `within`. A
/// check that itself hangs is cut at the same deadline.
pub async fn eventually<F, Fut, C>(what: &str, within: Duration, mut check: F) -> C::Value
where
    F: FnMut() -> Fut,
    Fut: Future<Output = C>,
    C: Check,
{
    let mut last: Option<String> = None;
    let polled = tokio::time::timeout(within, async {
        loop {
            match check().await.outcome() {
                Ok(value) => return value,
                Err(seen) => last = seen,
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    })
    .await;
    match polled {
        Ok(value) => value,
        Err(_) => match last {
            Some(seen) => panic!("{what}: not within {within:?} (last seen: {seen})"),
            None => panic!("{what}: not within {within:?}"),
        },
    }
}
