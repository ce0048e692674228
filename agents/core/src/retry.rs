//! The one place where retry policy lives: exponential, jittered, bounded.
//!
//! Redelivery counts come from JetStream (`delivered` in the message info), not from memory, so a
//! restarted agent continues the same back-off instead of starting over.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Delay before the next delivery of a message that failed with a retryable error, given how
/// many times it has been delivered already (1 = first delivery). Jittered by ±25%.
pub fn redelivery_delay(delivered: i64) -> Duration {
    let attempts = delivered.clamp(1, 32) as u32;
    let base = Duration::from_millis(500).saturating_mul(2u32.saturating_pow(attempts - 1));
    let capped = base.min(Duration::from_secs(30));
    jitter(capped)
}

fn jitter(d: Duration) -> Duration {
    let factor = 0.75 + rand_unit() * 0.5;
    d.mul_f64(factor)
}

/// A cheap uniform sample in [0, 1) without a global RNG: sub-second clock noise mixed by a
/// multiplicative hash. Jitter only needs to de-synchronise agents, not be unpredictable.
fn rand_unit() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let mixed = (u64::from(nanos) ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

/// A back-off for calls an agent retries in place (connecting, reading history): starts at
/// 100 ms, grows ×2 with jitter, caps each wait at 5 s and ends once the waits add up to
/// `max_elapsed`. (backon, the retry crate kube's runtime is built on.)
pub fn policy(max_elapsed: Duration) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(max_elapsed))
        .build()
}

/// Runs `op` until it succeeds, it fails with an error `retryable` says is permanent, or the
/// policy gives up; returns the last error then.
pub async fn retry<T, E, F, Fut>(
    max_elapsed: Duration,
    retryable: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = policy(max_elapsed);
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if retryable(&e) => match backoff.next() {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_delays_grow_and_are_bounded() {
        let table = [
            (1, 500),
            (2, 1000),
            (3, 2000),
            (5, 8000),
            (7, 30_000),
            (40, 30_000),
            (-3, 500),
        ];
        for (delivered, base_ms) in table {
            let d = redelivery_delay(delivered).as_millis() as f64;
            let base = base_ms as f64;
            assert!(
                d >= base * 0.75 - 1.0 && d <= base * 1.25 + 1.0,
                "delivered {delivered}: {d}ms"
            );
        }
    }

    #[tokio::test]
    async fn retry_stops_on_a_permanent_error_and_succeeds_after_transient_ones() {
        let mut calls = 0;
        let r: Result<u32, &str> = retry(
            Duration::from_secs(5),
            |e| *e == "transient",
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err("transient")
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(r, Ok(3));

        let mut calls = 0;
        let r: Result<u32, &str> = retry(
            Duration::from_secs(5),
            |e| *e == "transient",
            || {
                calls += 1;
                async { Err("permanent") }
            },
        )
        .await;
        assert_eq!((r, calls), (Err("permanent"), 1));
    }
}
