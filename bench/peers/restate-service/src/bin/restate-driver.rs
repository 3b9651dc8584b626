//! Drives the `seq` workload through Restate's ingress: C tasks, each sending one
//! `POST {ingress}/Seq/run` with `{"n": i, "steps": K}` at a time and waiting for the response
//! (the ingress answers when the invocation has finished), until N invocations are done.
//! Prints one JSON object in the same shape as the Python drivers (bench/peers/common.py).
//!
//! Usage: restate-driver INGRESS_URL INSTANCES STEPS CONCURRENCY [MAX_SECONDS]
//! With MAX_SECONDS, no new invocation starts after that many seconds (those in flight finish
//! and count).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let k = ((q * sorted.len() as f64 + 0.5).round() as i64 - 1).clamp(0, sorted.len() as i64 - 1);
    Some(sorted[k as usize])
}

fn r3(v: Option<f64>) -> serde_json::Value {
    match v {
        Some(x) => serde_json::json!((x * 1000.0).round() / 1000.0),
        None => serde_json::Value::Null,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 && args.len() != 6 {
        eprintln!("usage: restate-driver INGRESS_URL INSTANCES STEPS CONCURRENCY [MAX_SECONDS]");
        std::process::exit(2);
    }
    let url = format!("{}/Seq/run", args[1].trim_end_matches('/'));
    let instances: usize = args[2].parse().expect("INSTANCES");
    let steps: u32 = args[3].parse().expect("STEPS");
    let concurrency: usize = args[4].parse().expect("CONCURRENCY");
    let max_seconds: Option<f64> = args.get(5).map(|s| s.parse().expect("MAX_SECONDS"));

    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(concurrency)
        .build_http();

    let call = {
        let client = client.clone();
        let url = url.clone();
        move |i: i64| {
            let client = client.clone();
            let url = url.clone();
            async move {
                let body = serde_json::to_vec(&serde_json::json!({"n": i, "steps": steps})).unwrap();
                let req = hyper::Request::post(url.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| e.to_string())?;
                let resp = client.request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
                if !status.is_success() {
                    return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)));
                }
                let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
                if v.get("n").and_then(|n| n.as_i64()) != Some(i) {
                    return Err(format!("wrong result {v} for {i}"));
                }
                Ok::<(), String>(())
            }
        }
    };

    // Warm-up: one invocation end to end, so connection set-up is not measured.
    if let Err(e) = call(-1).await {
        eprintln!("warm-up failed: {e}");
        std::process::exit(1);
    }

    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let call = call.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errs = Vec::new();
            loop {
                if max_seconds.is_some_and(|m| start.elapsed().as_secs_f64() >= m) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= instances {
                    break;
                }
                let t0 = Instant::now();
                match call(i as i64).await {
                    Ok(()) => lat.push(t0.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => errs.push(e),
                }
            }
            (lat, errs)
        }));
    }
    let mut lat = Vec::new();
    let mut errs = Vec::new();
    for t in tasks {
        let (l, e) = t.await.expect("task");
        lat.extend(l);
        errs.extend(e);
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let done = lat.len();
    let out = serde_json::json!({
        "system": "restate",
        "instances": instances,
        "completed": done,
        "errors": errs.len(),
        "first_errors": errs.iter().take(3).map(|e| e.chars().take(300).collect::<String>()).collect::<Vec<_>>(),
        "steps": steps,
        "concurrency": concurrency,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
        "instances_per_s": (done as f64 / elapsed * 10.0).round() / 10.0,
        "step_completions_per_s": (done as f64 * steps as f64 / elapsed * 10.0).round() / 10.0,
        "latency_ms": {
            "p50": r3(percentile(&lat, 0.50)),
            "p90": r3(percentile(&lat, 0.90)),
            "p99": r3(percentile(&lat, 0.99)),
            "max": r3(lat.last().copied()),
        },
    });
    println!("{out}");
}
