//! `GET /metrics`: this node's figures in Prometheus's text format (version 0.0.4).

use std::fmt::Write;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use weir_store::{LatencySnapshot, LATENCY_BUCKETS_SECONDS};

use crate::AppState;

/// The content type of Prometheus's text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    let commits = state.engine.commit_stats();
    let mut text = String::new();
    histogram(
        &mut text,
        "weir_commit_seconds",
        "Time of each group commit's store transaction, its WAL sync included.",
        &commits.transactions,
    );
    single(
        &mut text,
        "counter",
        "weir_commit_batches_total",
        "Partition batches merged into group commits (divided by the commits: the group size).",
        commits.batches,
    );
    single(
        &mut text,
        "counter",
        "weir_commit_failures_total",
        "Group commits that failed; their batches were answered with the error.",
        commits.failures,
    );
    single(
        &mut text,
        "counter",
        "weir_commits_in_place_total",
        "Group commits made on the thread that made the batch, as nothing else waited (one batch each).",
        commits.in_place,
    );
    if let Some(syncs) = &commits.wal_syncs {
        histogram(
            &mut text,
            "weir_store_wal_sync_seconds",
            "Time of each sync (fsync) of the embedded store's write-ahead log: what makes a commit durable.",
            syncs,
        );
    }
    histogram(
        &mut text,
        "weir_task_dispatch_seconds",
        "Time each task this node handed out waited on its board, from its offer (its row committed), its lease's expiry or its paused instance's resume, to a worker's lease.",
        &state.engine.task_dispatch_waits(),
    );
    single(
        &mut text,
        "gauge",
        "weir_tasks_pending",
        "Tasks on this node's board, offered or leased.",
        state.engine.tasks_pending() as u64,
    );
    ([(CONTENT_TYPE, TEXT_FORMAT)], text).into_response()
}

/// A metric of one sample: `kind` is `counter` or `gauge`.
fn single(text: &mut String, kind: &str, name: &str, help: &str, value: u64) {
    let _ = writeln!(
        text,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// A histogram's buckets are cumulative in this format, and end with `+Inf`.
fn histogram(text: &mut String, name: &str, help: &str, snapshot: &LatencySnapshot) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} histogram");
    let mut cumulative = 0;
    for (count, bound) in snapshot.buckets.iter().zip(LATENCY_BUCKETS_SECONDS) {
        cumulative += count;
        let _ = writeln!(text, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
    }
    let _ = writeln!(text, "{name}_bucket{{le=\"+Inf\"}} {}", snapshot.count());
    let _ = writeln!(text, "{name}_sum {}", snapshot.sum_seconds);
    let _ = writeln!(text, "{name}_count {}", snapshot.count());
}
