//! The workloads' definitions, and how one instance is started and awaited over HTTP.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// How long one `GET /v1/instances/{id}?wait_ms=` waits before it is asked again.
const WAIT_MS: u64 = 30_000;

/// Instances per page when counting the pending instances of a `start` run (the API's most).
const LIST_PAGE: usize = 1000;

/// How long a request that a node answers `503` (its partitions moving, as when a node
/// joins or leaves the cluster) is asked again before the run fails.
const UNAVAILABLE_RETRY_MAX: Duration = Duration::from_secs(30);

/// The pause before such a request is asked again.
const UNAVAILABLE_RETRY_PAUSE: Duration = Duration::from_millis(20);

/// The definition of `seq`: `steps` task steps in a row on queue `bench`.
pub(super) fn seq_definition(steps: usize) -> (String, String) {
    let name = format!("bench-seq-{steps}");
    let mut definition = format!("name: {name}\nsteps:\n");
    for step in 0..steps {
        definition.push_str(&format!(
            "  - id: s{step}\n    task: bench\n    input: {{ n: \"${{ .input.n }}\" }}\n"
        ));
    }
    (name, definition)
}

/// The definition of `fanout`: one `foreach` step over `fanout` items, all in progress at once,
/// each a task on queue `bench`; the step joins when every item's task has completed.
pub(super) fn fanout_definition(fanout: usize) -> (String, String) {
    let name = format!("bench-fanout-{fanout}");
    let definition = format!(
        "name: {name}\n\
         steps:\n  \
         - id: fan\n    \
         foreach:\n      \
         items: \"${{ [range({fanout})] }}\"\n      \
         concurrency: {fanout}\n      \
         steps:\n        \
         - task: bench\n          \
         input: {{ n: \"${{ .input.n }}\", item: \"${{ .item }}\" }}\n"
    );
    (name, definition)
}

/// The definition of `timers`: a durable sleep, then one task on queue `bench`.
pub(super) fn timers_definition(sleep: Duration) -> (String, String) {
    let ms = sleep.as_millis();
    let name = format!("bench-timers-{ms}ms");
    let definition = format!(
        "name: {name}\n\
         steps:\n  \
         - id: nap\n    \
         sleep: {ms}ms\n  \
         - id: after\n    \
         task: bench\n    \
         input: {{ n: \"${{ .input.n }}\" }}\n"
    );
    (name, definition)
}

/// The definition of `start`: one task on `queue`, which nobody polls. Definition and queue are
/// unique to the run, so that its instances can be counted and left alone.
pub(super) fn start_definition(queue: &str) -> (String, String) {
    let name = queue.to_owned();
    let definition = format!(
        "name: {name}\nsteps:\n  - id: s0\n    task: {queue}\n    input: {{ n: \"${{ .input.n }}\" }}\n"
    );
    (name, definition)
}

/// Deploys `source` through the first node. Every other node is asked for that version, and
/// given it when it does not know it: nodes of one cluster share their store and know it
/// already; independent servers (no shared store) each need their own copy.
pub(super) async fn deploy(
    client: &reqwest::Client,
    nodes: &[String],
    name: &str,
    source: &str,
) -> anyhow::Result<()> {
    let Some((first, others)) = nodes.split_first() else {
        bail!("no server URL");
    };
    let version = deploy_to(client, first, source).await?;
    for node in others {
        let response = client
            .get(format!("{node}/v1/definitions/{name}?version={version}"))
            .send()
            .await
            .with_context(|| format!("asking {node} for {name} version {version}"))?;
        match response.status().as_u16() {
            200 => {}
            404 => {
                deploy_to(client, node, source).await?;
            }
            status => bail!(
                "{node} answered {status} for {name} version {version}: {}",
                response.text().await.unwrap_or_default()
            ),
        }
    }
    Ok(())
}

/// Deploys `source` to `node`; returns the new version.
async fn deploy_to(client: &reqwest::Client, node: &str, source: &str) -> anyhow::Result<u64> {
    let response = client
        .post(format!("{node}/v1/definitions"))
        .header("content-type", "application/yaml")
        .body(source.to_owned())
        .send()
        .await
        .with_context(|| format!("deploying to {node}"))?;
    if response.status().as_u16() != 201 {
        bail!(
            "deploy answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let deployed: Value = response.json().await.context("deploy answer")?;
    deployed["version"]
        .as_u64()
        .with_context(|| format!("deploy answer without a version: {deployed}"))
}

/// Starts an instance of `name` through `node`, with input `{"n": n}`: instance `id`, or
/// one whose id the engine makes.
pub(super) async fn start(
    client: &reqwest::Client,
    node: &str,
    name: &str,
    id: Option<&str>,
    n: usize,
) -> anyhow::Result<()> {
    start_waiting(client, node, name, id, n, 0).await.map(drop)
}

/// Starts an instance (see [`start`]) and waits up to `wait_ms` for it to end in the
/// same request (`POST /v1/instances?wait_ms=`); its id and its status when the answer
/// came.
async fn start_waiting(
    client: &reqwest::Client,
    node: &str,
    name: &str,
    id: Option<&str>,
    n: usize,
    wait_ms: u64,
) -> anyhow::Result<Answer> {
    let body = match id {
        Some(id) => json!({ "definition": name, "id": id, "input": { "n": n } }),
        None => json!({ "definition": name, "input": { "n": n } }),
    };
    let started = Instant::now();
    let response = loop {
        let mut request = client.post(format!("{node}/v1/instances")).json(&body);
        if wait_ms > 0 {
            request = request.query(&[("wait_ms", wait_ms)]);
        }
        let response = request.send().await?;
        // A start that names its instance is idempotent, so it is asked again while the
        // instance's partition moves; one without an id is not, so it is not.
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
            && id.is_some()
            && started.elapsed() < UNAVAILABLE_RETRY_MAX
        {
            tokio::time::sleep(UNAVAILABLE_RETRY_PAUSE).await;
            continue;
        }
        break response;
    };
    if !response.status().is_success() {
        bail!(
            "start answered {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    answer_of(&response.bytes().await?)
}

/// What the client reads of an instance's JSON view.
#[derive(Debug, PartialEq, serde::Deserialize)]
struct Answer {
    id: String,
    status: String,
}

/// The `id` and `status` of an instance's JSON view. Only those fields are decoded: the
/// client shares the machine with the server it measures, so its own cost per instance is
/// kept low.
fn answer_of(body: &[u8]) -> anyhow::Result<Answer> {
    match serde_json::from_slice::<Answer>(body) {
        Ok(answer) => Ok(answer),
        Err(_) => bail!("unexpected answer: {}", String::from_utf8_lossy(body)),
    }
}

/// Starts an instance (see [`start`]) and waits for it to end: one request when it ends
/// within [`WAIT_MS`], as a client that wants a workflow's result makes it; its final
/// status.
pub(super) async fn start_and_wait(
    client: &reqwest::Client,
    node: &str,
    name: &str,
    id: Option<&str>,
    n: usize,
) -> anyhow::Result<String> {
    let answer = start_waiting(client, node, name, id, n, WAIT_MS).await?;
    if is_running(&answer.status) {
        return wait_end(client, node, &answer.id).await;
    }
    Ok(answer.status)
}

/// Whether a status is one an instance can still leave.
fn is_running(status: &str) -> bool {
    matches!(status, "running" | "paused" | "compensating")
}

/// Waits for instance `id` to end, asking `node`; returns its final status.
pub(super) async fn wait_end(
    client: &reqwest::Client,
    node: &str,
    id: &str,
) -> anyhow::Result<String> {
    let mut unavailable_since = None;
    loop {
        let response = client
            .get(format!("{node}/v1/instances/{id}?wait_ms={WAIT_MS}"))
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            let since = *unavailable_since.get_or_insert_with(Instant::now);
            if since.elapsed() < UNAVAILABLE_RETRY_MAX {
                tokio::time::sleep(UNAVAILABLE_RETRY_PAUSE).await;
                continue;
            }
        }
        unavailable_since = None;
        if !response.status().is_success() {
            bail!(
                "waiting for {id} answered {}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        let answer = answer_of(&response.bytes().await?)?;
        // Not ended yet: the wait was over first.
        if !is_running(&answer.status) {
            return Ok(answer.status);
        }
    }
}

/// Counts the running instances of definition `name`: the union of the ids every node lists,
/// which is right both for a cluster (every node lists them all) and for independent servers
/// (each lists its own). Each node is read at most `expected` plus one page deep (the run
/// started no more than `expected`).
pub(super) async fn count_running(
    client: &reqwest::Client,
    nodes: &[String],
    name: &str,
    expected: usize,
) -> anyhow::Result<usize> {
    let mut ids = HashSet::new();
    for node in nodes {
        list_running(client, node, name, expected, &mut ids).await?;
    }
    Ok(ids.len())
}

/// Adds the ids of the running instances of `name` that `node` lists to `ids`.
async fn list_running(
    client: &reqwest::Client,
    node: &str,
    name: &str,
    expected: usize,
    ids: &mut HashSet<String>,
) -> anyhow::Result<()> {
    let pages_max = expected / LIST_PAGE + 2;
    let mut cursor: Option<String> = None;
    for _ in 0..pages_max {
        let mut request = client.get(format!("{node}/v1/instances")).query(&[
            ("status", "running"),
            ("definition", name),
            ("limit", &LIST_PAGE.to_string()),
        ]);
        if let Some(cursor) = &cursor {
            request = request.query(&[("cursor", cursor)]);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("listing instances on {node}"))?;
        if !response.status().is_success() {
            bail!(
                "listing instances on {node} answered {}: {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        let page: Value = response.json().await.context("instance list")?;
        let listed = page["instances"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        ids.extend(
            listed
                .iter()
                .filter_map(|instance| instance["id"].as_str())
                .map(str::to_owned),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return Ok(()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(source: &str) {
        if let Err(problems) = weir_model::dsl::parse(source) {
            panic!("{source}\n{problems:?}");
        }
    }

    #[test]
    fn answer_of_reads_the_id_and_status_alone() {
        // Goal: the client's cheap decoding finds the id (made by the engine, with
        // --ids engine) and the status among every other field, and says what came when
        // either is missing.
        let body = br#"{"id":"a","status":"completed","output":{"x":[1,2]},"created":true}"#;
        assert_eq!(
            answer_of(body).unwrap(),
            Answer {
                id: "a".into(),
                status: "completed".into()
            }
        );
        let error = answer_of(br#"{"error":{"code":"not_found"}}"#).unwrap_err();
        assert!(error.to_string().contains("not_found"), "{error}");
        let error = answer_of(br#"{"status":"running"}"#).unwrap_err();
        assert!(error.to_string().contains("running"), "{error}");
        assert!(answer_of(b"not json").is_err());
    }

    #[test]
    fn definitions_are_valid() {
        // Goal: every workload's definition passes the server's own parser and validation.
        let (name, source) = seq_definition(3);
        assert_eq!(name, "bench-seq-3");
        valid(&source);
        let (name, source) = fanout_definition(10);
        assert_eq!(name, "bench-fanout-10");
        valid(&source);
        let (name, source) = timers_definition(Duration::from_millis(1500));
        assert_eq!(name, "bench-timers-1500ms");
        valid(&source);
        let (name, source) = start_definition("bench-start-0a1b2c3d");
        assert_eq!(name, "bench-start-0a1b2c3d");
        valid(&source);
    }

    #[test]
    fn seq_definition_is_unchanged() {
        // Goal: `seq` runs exactly the definition its published figures were measured with.
        assert_eq!(
            seq_definition(2).1,
            "name: bench-seq-2\nsteps:\n  - id: s0\n    task: bench\n    input: { n: \"${ .input.n }\" }\n  - id: s1\n    task: bench\n    input: { n: \"${ .input.n }\" }\n"
        );
    }
}
