//! The servers' group commits and WAL syncs over a run, from their `GET /metrics`.
//!
//! At one instance in flight every commit is that instance's, one after the other, so
//! the run's time divided by its commits is the cycle of one step, and that cycle minus
//! the mean WAL sync is what a step costs beyond its fsync: the fsync measured where it
//! happens, for the writes the server really makes.

use std::time::Duration;

/// Counters of one or more nodes' `GET /metrics`, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct CommitCounters {
    pub commits: f64,
    pub commit_seconds: f64,
    pub batches: f64,
    /// Commits made in place (0 from a server older than the counter).
    pub in_place: f64,
    /// `None` when a node reported no WAL syncs (PostgreSQL).
    pub wal_syncs: Option<(f64, f64)>,
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
}

/// The summed counters of `nodes`, or `None` if one of them did not answer with them
/// (a server older than the metrics, say): the run is still measured without them.
pub(super) async fn scrape(client: &reqwest::Client, nodes: &[String]) -> Option<CommitCounters> {
    let mut total = CommitCounters {
        wal_syncs: Some((0.0, 0.0)),
        ..CommitCounters::default()
    };
    for node in nodes {
        let response = client.get(format!("{node}/metrics")).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let counters = parse(&response.text().await.ok()?)?;
        total.commits += counters.commits;
        total.commit_seconds += counters.commit_seconds;
        total.batches += counters.batches;
        total.in_place += counters.in_place;
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
    })
}

/// What happened between two scrapes; `None` if nothing was committed.
pub(super) fn between(before: CommitCounters, after: CommitCounters) -> Option<CommitFigures> {
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
    Some(CommitFigures {
        commits: commits as u64,
        commit_mean: mean(after.commit_seconds - before.commit_seconds, commits),
        batches_per_commit: (after.batches - before.batches) / commits,
        in_place: (after.in_place - before.in_place).max(0.0) as u64,
        wal_syncs,
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
        };
        let figures = between(before, after).unwrap();
        assert_eq!(figures.commits, 10);
        assert_eq!(figures.commit_mean, Duration::from_micros(500));
        assert_eq!(figures.batches_per_commit, 2.0);
        assert_eq!(figures.in_place, 3);
        assert_eq!(figures.wal_syncs, Some((10, Duration::from_micros(200))));
        assert_eq!(between(before, before), None);
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
            counters,
            CommitCounters {
                commits: 11.0,
                ..counters
            },
        )
        .unwrap();
        assert_eq!(figures.wal_syncs, None);
        assert_eq!(parse("no metrics here"), None);
    }
}
