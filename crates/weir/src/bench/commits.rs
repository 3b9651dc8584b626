//! The servers' group commits, WAL syncs and task dispatch waits over a run, from their
//! `GET /metrics`.
//!
//! At one instance in flight every commit is that instance's, one after the other, so
//! the run's time divided by its commits is the cycle of one step, and that cycle minus
//! the mean WAL sync is what a step costs beyond its fsync: the fsync measured where it
//! happens, for the writes the server really makes.

use std::time::Duration;

/// Counters of one or more nodes' `GET /metrics`, summed.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct CommitCounters {
    pub commits: f64,
    pub commit_seconds: f64,
    pub batches: f64,
    /// Commits made in place (0 from a server older than the counter).
    pub in_place: f64,
    /// `None` when a node reported no WAL syncs (PostgreSQL).
    pub wal_syncs: Option<(f64, f64)>,
    /// `None` when a node reported no dispatch waits (a server older than the histogram).
    pub dispatch: Option<Histogram>,
}

/// The metric name of the servers' task dispatch waits.
const DISPATCH_METRIC: &str = "weir_task_dispatch_seconds";

/// A Prometheus histogram's samples: cumulative counts by upper bound (the last one
/// `+Inf`), and the sum.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
}

impl Histogram {
    /// `name`'s samples in `text`, or `None` without them or with buckets out of order.
    fn parse(text: &str, name: &str) -> Option<Histogram> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut buckets = Vec::new();
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let Some(rest) = line.strip_prefix(&prefix) else {
                continue;
            };
            let (bound, count) = rest.split_once("\"} ")?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            buckets.push((bound, count.parse().ok()?));
        }
        let ordered = buckets
            .windows(2)
            .all(|pair| pair[0].0 < pair[1].0 && pair[0].1 <= pair[1].1);
        if buckets.last()?.0 != f64::INFINITY || !ordered {
            return None;
        }
        let sum = text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix("_sum ")?.parse().ok())?;
        Some(Histogram { buckets, sum })
    }

    /// This histogram's counts and sum plus `sign` times `other`'s (1 adds another node's,
    /// −1 takes an earlier scrape's away), or `None` if their bounds differ.
    fn plus(&self, other: &Histogram, sign: f64) -> Option<Histogram> {
        if self.buckets.len() != other.buckets.len() {
            return None;
        }
        let mut buckets = Vec::with_capacity(self.buckets.len());
        for (&(bound, count), &(other_bound, other_count)) in
            self.buckets.iter().zip(&other.buckets)
        {
            if bound != other_bound {
                return None;
            }
            buckets.push((bound, count + sign * other_count));
        }
        Some(Histogram {
            buckets,
            sum: self.sum + sign * other.sum,
        })
    }

    fn count(&self) -> f64 {
        self.buckets.last().map_or(0.0, |&(_, count)| count)
    }

    /// The `q` quantile, interpolated linearly inside its bucket (as Prometheus's
    /// `histogram_quantile` does); in the `+Inf` bucket, the last finite bound.
    fn quantile(&self, q: f64) -> Duration {
        let rank = q * self.count();
        let mut lower = (0.0, 0.0);
        for &(bound, count) in &self.buckets {
            if count >= rank && count > lower.1 {
                if bound.is_infinite() {
                    return Duration::from_secs_f64(lower.0);
                }
                let within = (rank - lower.1) / (count - lower.1);
                return Duration::from_secs_f64(lower.0 + (bound - lower.0) * within);
            }
            lower = (bound, count);
        }
        Duration::from_secs_f64(lower.0)
    }

    /// The upper bound of the highest bucket that counted something (`None`: `+Inf`).
    fn max_bound(&self) -> Option<Duration> {
        let mut previous = 0.0;
        let mut highest = None;
        for &(bound, count) in &self.buckets {
            if count > previous {
                highest = Some(bound);
            }
            previous = count;
        }
        highest
            .filter(|bound| bound.is_finite())
            .map(Duration::from_secs_f64)
    }
}

/// How long the tasks handed out during a run waited on the servers' boards, from their
/// offer to a worker's lease (`weir_task_dispatch_seconds`): quantiles estimated from
/// the histogram's buckets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct DispatchWaits {
    pub count: u64,
    pub mean: Duration,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    /// The upper bound of the slowest bucket that counted a wait (`None`: above 60 s).
    pub max_at_most: Option<Duration>,
}

/// What the nodes committed during a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct CommitFigures {
    pub commits: u64,
    pub commit_mean: Duration,
    pub batches_per_commit: f64,
    /// Commits the server made in place rather than on its committer thread.
    pub in_place: u64,
    /// Count and mean of the WAL syncs, on the embedded store.
    pub wal_syncs: Option<(u64, Duration)>,
    /// The tasks' waits on the boards; `None` if no task was handed out.
    pub dispatch: Option<DispatchWaits>,
}

/// The summed counters of `nodes`, or `None` if one of them did not answer with them
/// (a server older than the metrics, say): the run is still measured without them.
pub(super) async fn scrape(client: &reqwest::Client, nodes: &[String]) -> Option<CommitCounters> {
    let mut total = CommitCounters {
        wal_syncs: Some((0.0, 0.0)),
        ..CommitCounters::default()
    };
    for (index, node) in nodes.iter().enumerate() {
        let response = client.get(format!("{node}/metrics")).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let counters = parse(&response.text().await.ok()?)?;
        total.commits += counters.commits;
        total.commit_seconds += counters.commit_seconds;
        total.batches += counters.batches;
        total.in_place += counters.in_place;
        // Summed while every node has the histogram: its bounds are only known from one.
        total.dispatch = match (index, &total.dispatch, &counters.dispatch) {
            (0, _, dispatch) => dispatch.clone(),
            (_, Some(sum), Some(more)) => sum.plus(more, 1.0),
            _ => None,
        };
        total.wal_syncs = match (total.wal_syncs, counters.wal_syncs) {
            (Some((count, seconds)), Some((more, more_seconds))) => {
                Some((count + more, seconds + more_seconds))
            }
            _ => None,
        };
    }
    Some(total)
}

/// The counters in one node's Prometheus text.
fn parse(text: &str) -> Option<CommitCounters> {
    let sample = |name: &str| {
        text.lines()
            .filter(|line| !line.starts_with('#'))
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    let wal_syncs =
        sample("weir_store_wal_sync_seconds_count").zip(sample("weir_store_wal_sync_seconds_sum"));
    Some(CommitCounters {
        commits: sample("weir_commit_seconds_count")?,
        commit_seconds: sample("weir_commit_seconds_sum")?,
        batches: sample("weir_commit_batches_total")?,
        in_place: sample("weir_commits_in_place_total").unwrap_or(0.0),
        wal_syncs,
        dispatch: Histogram::parse(text, DISPATCH_METRIC),
    })
}

/// What happened between two scrapes; `None` if nothing was committed.
pub(super) fn between(before: &CommitCounters, after: &CommitCounters) -> Option<CommitFigures> {
    let commits = after.commits - before.commits;
    if commits < 1.0 {
        return None;
    }
    let mean = |seconds: f64, count: f64| Duration::from_secs_f64((seconds / count).max(0.0));
    let wal_syncs = match (before.wal_syncs, after.wal_syncs) {
        (Some((count, seconds)), Some((count_after, seconds_after)))
            if count_after - count >= 1.0 =>
        {
            Some((
                (count_after - count) as u64,
                mean(seconds_after - seconds, count_after - count),
            ))
        }
        _ => None,
    };
    let dispatch = match (&before.dispatch, &after.dispatch) {
        (Some(before), Some(after)) => after.plus(before, -1.0),
        _ => None,
    }
    .filter(|run| run.count() >= 1.0)
    .map(|run| DispatchWaits {
        count: run.count() as u64,
        mean: mean(run.sum, run.count()),
        p50: run.quantile(0.5),
        p90: run.quantile(0.9),
        p99: run.quantile(0.99),
        max_at_most: run.max_bound(),
    });
    Some(CommitFigures {
        commits: commits as u64,
        commit_mean: mean(after.commit_seconds - before.commit_seconds, commits),
        batches_per_commit: (after.batches - before.batches) / commits,
        in_place: (after.in_place - before.in_place).max(0.0) as u64,
        wal_syncs,
        dispatch,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# HELP weir_commit_seconds x
# TYPE weir_commit_seconds histogram
weir_commit_seconds_bucket{le=\"0.001\"} 9
weir_commit_seconds_bucket{le=\"+Inf\"} 10
weir_commit_seconds_sum 0.004
weir_commit_seconds_count 10
weir_commit_batches_total 25
weir_commit_failures_total 0
weir_commits_in_place_total 4
weir_store_wal_sync_seconds_sum 0.0015
weir_store_wal_sync_seconds_count 12
";

    #[test]
    fn the_figures_are_the_differences_of_two_scrapes() {
        let before = parse(TEXT).unwrap();
        assert_eq!(before.commits, 10.0);
        assert_eq!(before.wal_syncs, Some((12.0, 0.0015)));
        assert_eq!(before.in_place, 4.0);
        let after = CommitCounters {
            commits: 20.0,
            commit_seconds: 0.009,
            batches: 45.0,
            in_place: 7.0,
            wal_syncs: Some((22.0, 0.0035)),
            dispatch: None,
        };
        let figures = between(&before, &after).unwrap();
        assert_eq!(figures.commits, 10);
        assert_eq!(figures.commit_mean, Duration::from_micros(500));
        assert_eq!(figures.batches_per_commit, 2.0);
        assert_eq!(figures.in_place, 3);
        assert_eq!(figures.wal_syncs, Some((10, Duration::from_micros(200))));
        assert_eq!(figures.dispatch, None, "no dispatch histogram after");
        assert_eq!(between(&before, &before), None);
    }

    #[test]
    fn a_node_without_wal_syncs_leaves_them_out() {
        let postgres: String = TEXT
            .lines()
            .filter(|line| !line.contains("wal_sync"))
            .map(|line| format!("{line}\n"))
            .collect();
        let counters = parse(&postgres).unwrap();
        assert_eq!(counters.wal_syncs, None);
        let figures = between(
            &counters,
            &CommitCounters {
                commits: 11.0,
                ..counters.clone()
            },
        )
        .unwrap();
        assert_eq!(figures.wal_syncs, None);
        assert_eq!(parse("no metrics here"), None);
    }

    /// A node's dispatch histogram in the server's format, with cumulative `counts` for
    /// the bounds 0.001, 0.01, 0.1 and +Inf.
    fn dispatch_text(counts: [u64; 4], sum: f64) -> String {
        let mut text = String::from(TEXT);
        text.push_str("# TYPE weir_task_dispatch_seconds histogram\n");
        for (bound, count) in ["0.001", "0.01", "0.1", "+Inf"].iter().zip(counts) {
            text.push_str(&format!(
                "weir_task_dispatch_seconds_bucket{{le=\"{bound}\"}} {count}\n"
            ));
        }
        text.push_str(&format!("weir_task_dispatch_seconds_sum {sum}\n"));
        text.push_str(&format!("weir_task_dispatch_seconds_count {}\n", counts[3]));
        text
    }

    #[test]
    fn dispatch_waits_are_the_run_s_buckets_with_interpolated_quantiles() {
        // Goal: the run's dispatch waits are the difference of two scrapes' histograms;
        // a quantile is interpolated inside its bucket, and a histogram that cannot be
        // read (out of order, no +Inf) counts as none.
        let before = parse(&dispatch_text([5, 5, 5, 5], 0.002)).unwrap();
        let after = CommitCounters {
            commits: 11.0,
            ..parse(&dispatch_text([55, 95, 105, 105], 1.202)).unwrap()
        };
        let waits = between(&before, &after).unwrap().dispatch.unwrap();
        // This run: 50 waits up to 1 ms, 40 up to 10 ms, 10 up to 100 ms.
        assert_eq!(waits.count, 100);
        assert_eq!(waits.mean, Duration::from_millis(12));
        assert_eq!(waits.p50, Duration::from_micros(1000));
        // The 90th is the 40th of 40 in (1 ms, 10 ms]; the 99th the 9th of 10 above.
        assert_eq!(waits.p90.as_micros(), 10_000);
        assert_eq!(waits.p99.as_micros(), 91_000);
        assert_eq!(waits.max_at_most, Some(Duration::from_millis(100)));

        let slow = parse(&dispatch_text([0, 0, 0, 3], 300.0)).unwrap();
        let none = CommitCounters {
            commits: 0.0,
            ..parse(&dispatch_text([0, 0, 0, 0], 0.0)).unwrap()
        };
        let waits = between(
            &none,
            &CommitCounters {
                commits: 1.0,
                ..slow
            },
        )
        .unwrap()
        .dispatch
        .unwrap();
        assert_eq!(
            waits.p50,
            Duration::from_millis(100),
            "the last finite bound"
        );
        assert_eq!(waits.max_at_most, None);
        assert_eq!(
            between(
                &none,
                &CommitCounters {
                    commits: 1.0,
                    ..none.clone()
                }
            )
            .unwrap()
            .dispatch,
            None,
            "no task handed out"
        );

        let disordered = dispatch_text([5, 4, 5, 5], 0.0);
        assert_eq!(parse(&disordered).unwrap().dispatch, None);
        let unbounded: String = dispatch_text([5, 5, 5, 5], 0.0)
            .lines()
            .filter(|line| !line.contains("+Inf"))
            .map(|line| format!("{line}\n"))
            .collect();
        assert_eq!(parse(&unbounded).unwrap().dispatch, None);
        assert_eq!(parse(TEXT).unwrap().dispatch, None);
    }
}
