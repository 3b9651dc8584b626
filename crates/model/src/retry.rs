//! Retry policies and the arithmetic of their delays.
//!
//! Randomness (jitter) is an input: the state machine derives it from the
//! instance, step and attempt so that replay gives the same delays.

use std::time::Duration;

/// How the delay between attempts grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backoff {
    /// Every delay is `interval`.
    Fixed,
    /// `interval * multiplier^(n-1)`, capped by `max_interval`.
    Exponential,
    /// `interval * n`, capped by `max_interval`.
    Linear,
}

/// How much randomness spreads the delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// The computed delay exactly.
    None,
    /// Uniform in `[0, delay]`.
    Full,
    /// Uniform in `[delay/2, delay]`.
    Equal,
}

/// A retry policy, as written in the DSL's `retry:` block.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; at least 1.
    pub max_attempts: u32,
    /// Growth of the delay.
    pub backoff: Backoff,
    /// Fixed delay, linear increment, or exponential initial interval.
    pub interval: Duration,
    /// Exponential growth factor (>= 1).
    pub multiplier: f64,
    /// Cap on any single delay.
    pub max_interval: Option<Duration>,
    /// Randomisation of each delay.
    pub jitter: Jitter,
    /// No attempt starts later than this after the first attempt started.
    pub max_duration: Option<Duration>,
    /// Error types that are never retried.
    pub non_retryable: Vec<String>,
}

impl Default for RetryPolicy {
    /// Three attempts, exponential from 1 s doubling to at most 1 min, no jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            backoff: Backoff::Exponential,
            interval: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Some(Duration::from_secs(60)),
            jitter: Jitter::None,
            max_duration: None,
            non_retryable: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `failed_attempt + 1`, after attempt `failed_attempt`
    /// (1-based) failed. `random` is a uniformly distributed 64-bit sample used for jitter.
    ///
    /// Never panics: absurd policies (a huge multiplier, attempt 4 billion) saturate at
    /// `max_interval`, or at `Duration::MAX` without one.
    pub fn delay(&self, failed_attempt: u32, random: u64) -> Duration {
        // Attempt 0 does not exist; treating it as attempt 1 beats a panic.
        let n = failed_attempt.max(1);
        let interval = self.interval.as_nanos();
        let mut nanos = match self.backoff {
            Backoff::Fixed => interval,
            Backoff::Linear => interval.saturating_mul(u128::from(n)),
            Backoff::Exponential => exponential(interval, self.multiplier, n - 1),
        };
        if let Some(max) = self.max_interval {
            nanos = nanos.min(max.as_nanos());
        }
        nanos = nanos.min(Duration::MAX.as_nanos());
        let jittered = match self.jitter {
            Jitter::None => nanos,
            Jitter::Full => uniform(nanos, random),
            Jitter::Equal => {
                let half = nanos / 2;
                // `nanos - half` rather than `half` so that an odd delay can still be reached.
                half + uniform(nanos - half, random)
            }
        };
        from_nanos(jittered)
    }

    /// Whether a failure of attempt `failed_attempt` (1-based) of type `error_type`
    /// is retried, `elapsed` after the first attempt started, given the next delay.
    pub fn should_retry(
        &self,
        failed_attempt: u32,
        error_type: &str,
        retryable: bool,
        elapsed: Duration,
        next_delay: Duration,
    ) -> bool {
        if !retryable || self.non_retryable.iter().any(|t| t == error_type) {
            return false;
        }
        if failed_attempt >= self.max_attempts {
            return false;
        }
        match self.max_duration {
            Some(max) => elapsed.saturating_add(next_delay) <= max,
            None => true,
        }
    }
}

/// `interval * multiplier^exponent` in nanoseconds, saturating.
fn exponential(interval: u128, multiplier: f64, exponent: u32) -> u128 {
    // Whole multipliers (the usual 2) are computed in integers so that delays are exact
    // at any size; f64 would round past 2^53 ns (about 104 days).
    if multiplier.fract() == 0.0 && (1.0..=f64::from(u32::MAX)).contains(&multiplier) {
        let factor = (multiplier as u128)
            .checked_pow(exponent)
            .unwrap_or(u128::MAX);
        return interval.saturating_mul(factor);
    }
    let exact = interval as f64 * multiplier.powf(f64::from(exponent));
    // `as` saturates: infinity becomes u128::MAX, NaN (a multiplier the DSL rejects) 0.
    exact as u128
}

/// A value in `[0, bound]` from a uniform 64-bit sample.
fn uniform(bound: u128, random: u64) -> u128 {
    let random = u128::from(random);
    if bound < 1 << 64 {
        // Multiply-shift maps [0, 2^64) onto [0, bound + 1) without the bias of `%`;
        // the product is below (bound + 1) * 2^64 <= 2^128, so it cannot overflow.
        ((bound + 1) * random) >> 64
    } else {
        // Over 584 years: precision no longer matters, staying within bounds does.
        (bound >> 64) * random
    }
}

fn from_nanos(nanos: u128) -> Duration {
    const NANOS_PER_SEC: u128 = 1_000_000_000;
    let secs = u64::try_from(nanos / NANOS_PER_SEC).unwrap_or(u64::MAX);
    // The remainder of a division by 10^9 always fits a u32.
    Duration::new(secs, (nanos % NANOS_PER_SEC) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(
        backoff: Backoff,
        interval_ms: u64,
        multiplier: f64,
        max_ms: Option<u64>,
    ) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            backoff,
            interval: Duration::from_millis(interval_ms),
            multiplier,
            max_interval: max_ms.map(Duration::from_millis),
            jitter: Jitter::None,
            max_duration: None,
            non_retryable: vec!["card_declined".to_string()],
        }
    }

    fn delays_ms(p: &RetryPolicy, attempts: u32) -> Vec<u128> {
        (1..=attempts).map(|n| p.delay(n, 0).as_millis()).collect()
    }

    #[test]
    fn fixed_is_the_interval() {
        let p = policy(Backoff::Fixed, 2000, 2.0, None);
        assert_eq!(delays_ms(&p, 4), [2000, 2000, 2000, 2000]);
    }

    #[test]
    fn linear_grows_by_the_interval() {
        let p = policy(Backoff::Linear, 500, 2.0, Some(1800));
        assert_eq!(delays_ms(&p, 5), [500, 1000, 1500, 1800, 1800]);
    }

    #[test]
    fn exponential_multiplies() {
        let p = policy(Backoff::Exponential, 1000, 2.0, Some(60_000));
        assert_eq!(
            delays_ms(&p, 8),
            [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
        let p = policy(Backoff::Exponential, 100, 1.5, None);
        assert_eq!(delays_ms(&p, 4), [100, 150, 225, 337]);
        let p = policy(Backoff::Exponential, 100, 1.0, None);
        assert_eq!(delays_ms(&p, 3), [100, 100, 100]);
    }

    #[test]
    fn default_policy() {
        let p = RetryPolicy::default();
        assert_eq!(
            delays_ms(&p, 8),
            [1000, 2000, 4000, 8000, 16_000, 32_000, 60_000, 60_000]
        );
    }

    #[test]
    fn attempt_zero_counts_as_one() {
        let p = policy(Backoff::Linear, 500, 2.0, None);
        assert_eq!(p.delay(0, 0), Duration::from_millis(500));
    }

    #[test]
    fn saturates_instead_of_overflowing() {
        let p = policy(Backoff::Exponential, u64::MAX, 1e300, None);
        assert_eq!(p.delay(u32::MAX, u64::MAX), Duration::MAX);
        let p = policy(Backoff::Exponential, 1000, 3.0, Some(5000));
        assert_eq!(p.delay(u32::MAX, 0), Duration::from_millis(5000));
        let p = policy(Backoff::Linear, u64::MAX, 1.0, None);
        assert_eq!(p.delay(u32::MAX, 0), Duration::MAX);
        let mut p = policy(Backoff::Fixed, 0, 1.0, None);
        p.interval = Duration::MAX;
        p.jitter = Jitter::Full;
        assert!(p.delay(1, u64::MAX) <= Duration::MAX);
        p.jitter = Jitter::Equal;
        assert!(p.delay(1, u64::MAX) >= Duration::MAX / 2);
    }

    #[test]
    fn full_jitter_spans_zero_to_delay() {
        let mut p = policy(Backoff::Fixed, 1000, 2.0, None);
        p.jitter = Jitter::Full;
        assert_eq!(p.delay(1, 0), Duration::ZERO);
        assert_eq!(p.delay(1, u64::MAX), Duration::from_millis(1000));
        assert_eq!(p.delay(1, 1 << 63), Duration::from_nanos(500_000_000));
    }

    #[test]
    fn equal_jitter_spans_half_to_delay() {
        let mut p = policy(Backoff::Fixed, 1000, 2.0, None);
        p.jitter = Jitter::Equal;
        assert_eq!(p.delay(1, 0), Duration::from_millis(500));
        assert_eq!(p.delay(1, u64::MAX), Duration::from_millis(1000));
        assert_eq!(p.delay(1, 1 << 63), Duration::from_nanos(750_000_000));
        p.interval = Duration::from_nanos(3);
        assert_eq!(p.delay(1, 0), Duration::from_nanos(1));
        assert_eq!(p.delay(1, u64::MAX), Duration::from_nanos(3));
    }

    #[test]
    fn should_retry_rules() {
        let mut p = policy(Backoff::Fixed, 1000, 2.0, None);
        p.max_attempts = 3;
        let s = Duration::from_secs;
        assert!(p.should_retry(1, "timeout", true, s(0), s(1)));
        assert!(p.should_retry(2, "timeout", true, s(0), s(1)));
        assert!(
            !p.should_retry(3, "timeout", true, s(0), s(1)),
            "attempts used up"
        );
        assert!(
            !p.should_retry(1, "timeout", false, s(0), s(1)),
            "not retryable"
        );
        assert!(
            !p.should_retry(1, "card_declined", true, s(0), s(1)),
            "listed"
        );
        p.max_duration = Some(s(10));
        assert!(
            p.should_retry(1, "timeout", true, s(9), s(1)),
            "exactly at the bound"
        );
        assert!(
            !p.should_retry(1, "timeout", true, s(9), s(2)),
            "past the bound"
        );
        assert!(!p.should_retry(1, "timeout", true, Duration::MAX, Duration::MAX));
        p.max_attempts = 1;
        assert!(
            !p.should_retry(1, "timeout", true, s(0), s(0)),
            "a single attempt"
        );
    }

    fn any_backoff() -> impl Strategy<Value = Backoff> {
        prop_oneof![
            Just(Backoff::Fixed),
            Just(Backoff::Linear),
            Just(Backoff::Exponential)
        ]
    }

    proptest! {
        #[test]
        fn jitter_stays_within_bounds(
            backoff in any_backoff(),
            interval in 0u64..=u64::MAX,
            multiplier in 1.0f64..10.0,
            max in proptest::option::of(0u64..=u64::MAX),
            attempt in 0u32..=u32::MAX,
            random in any::<u64>(),
        ) {
            let mut p = RetryPolicy {
                max_attempts: 10,
                backoff,
                interval: Duration::from_nanos(interval),
                multiplier,
                max_interval: max.map(Duration::from_nanos),
                jitter: Jitter::None,
                max_duration: None,
                non_retryable: Vec::new(),
            };
            let exact = p.delay(attempt, random);
            if let Some(max) = p.max_interval {
                prop_assert!(exact <= max);
            }
            p.jitter = Jitter::Full;
            prop_assert!(p.delay(attempt, random) <= exact);
            p.jitter = Jitter::Equal;
            let equal = p.delay(attempt, random);
            prop_assert!(equal <= exact);
            prop_assert!(equal >= exact / 2);
        }

        #[test]
        fn growing_backoffs_never_shrink(
            linear in any::<bool>(),
            interval in 0u64..=u64::MAX / 4,
            multiplier in 1.0f64..10.0,
            max in proptest::option::of(0u64..=u64::MAX),
            attempt in 1u32..u32::MAX,
        ) {
            let p = RetryPolicy {
                max_attempts: 10,
                backoff: if linear { Backoff::Linear } else { Backoff::Exponential },
                interval: Duration::from_nanos(interval),
                multiplier,
                max_interval: max.map(Duration::from_nanos),
                jitter: Jitter::None,
                max_duration: None,
                non_retryable: Vec::new(),
            };
            prop_assert!(p.delay(attempt, 0) <= p.delay(attempt + 1, 0));
        }

        #[test]
        fn first_attempts_never_shrink(
            interval in 0u64..=1_000_000_000_000,
            multiplier in 1.0f64..3.0,
            random in any::<u64>(),
        ) {
            let p = RetryPolicy {
                max_attempts: 10,
                backoff: Backoff::Exponential,
                interval: Duration::from_nanos(interval),
                multiplier,
                max_interval: None,
                jitter: Jitter::None,
                max_duration: None,
                non_retryable: Vec::new(),
            };
            let delays: Vec<Duration> = (1..40).map(|n| p.delay(n, random)).collect();
            prop_assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
        }
    }
}
