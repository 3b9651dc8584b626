//! The low-level HTTP client: one method per API call, with failover between nodes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{ApiError, Error};
use crate::wire::{
    DefinitionList, DefinitionSource, DefinitionSummary, Deployed, Event, History, Instance,
    InstanceFilter, InstancePage, OperationRequest, PollResponse, PolledTask, StartRequest,
    Started,
};
use crate::TaskError;

/// Default bound on one request, other than a poll.
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// Bound on opening a TCP connection. Short, so that a dead node is left quickly for the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Time a poll may take beyond its `wait_ms` before the client gives up on the node.
const POLL_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// Most idle keep-alive connections kept per node.
///
/// A busy worker runs a request per task completion; keeping connections open saves a TCP
/// handshake each time. The bound keeps a burst from leaving thousands of sockets behind.
const IDLE_CONNECTIONS_PER_NODE_MAX: usize = 256;

/// How long an idle pooled connection is kept.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Most server URLs one client accepts; a cluster is reached through a handful of them.
pub const SERVER_URLS_MAX: usize = 64;
/// Most completions in one [`Client::complete_many`] request (the server's limit).
pub const COMPLETIONS_BATCH_MAX: usize = 256;

/// What a completion asks for besides ([`Client::complete_then_take`]): up to `max_tasks`
/// more tasks of `queues` in its answer.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct NextTasks<'a> {
    /// Queues to take tasks of.
    pub queues: &'a [String],
    /// Most tasks to take (1 to [`POLL_TASKS_MAX`](crate::POLL_TASKS_MAX)).
    pub max_tasks: usize,
}

/// A client of one weir cluster, reached through one or more node URLs.
///
/// Cheap to clone: clones share the connection pool and the choice of node. A request goes
/// to the node that answered last; when that node cannot be reached (or answers 503, or
/// another 5xx to a request that is safe to repeat), the request is tried once on each of
/// the other nodes, and the first that answers is used from then on. A request that is not
/// safe to repeat (a deploy, a start without an id, every operation on an instance such as
/// cancel, pause or restart, a signal) moves to another node only when the connection could
/// not be opened or the node answered 503; after a timeout or a cut connection it may have
/// taken effect, so the error is returned instead. The client does not sleep between
/// nodes: callers that want to retry a failed call do so with their own backoff (the
/// [`Worker`](crate::Worker) does). Redirects are not followed: a weir node never answers
/// with one, so a 3xx comes back as [`Error::Api`] with its status.
///
/// ```no_run
/// # async fn example() -> Result<(), weir_sdk::Error> {
/// let client = weir_sdk::Client::new(vec!["http://127.0.0.1:7600".into()])?;
/// let instance = client.instance("order-42").await?;
/// println!("{} is {}", instance.id, instance.status);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    urls: Vec<Url>,
    /// Index into `urls` of the node to try first.
    current: AtomicUsize,
    request_timeout: Duration,
}

/// The format of a definition's source, which decides its content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// `application/yaml`.
    Yaml,
    /// `application/json`.
    Json,
}

/// Whether a request may be sent again after it may have reached a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Repeating has the same effect as sending once (reads, task calls with a lease
    /// token, starts with an id).
    Safe,
    /// Repeating could act twice; only retried where the request surely was not handled.
    Unsafe,
}

enum Body {
    Empty,
    Bytes {
        content_type: &'static str,
        bytes: Vec<u8>,
    },
}

struct Response {
    status: StatusCode,
    url: Url,
    bytes: Vec<u8>,
}

impl Client {
    /// A client for the nodes at `urls` (e.g. `http://127.0.0.1:7600`), tried in order.
    ///
    /// Fails when the list is empty or longer than [`SERVER_URLS_MAX`], or a URL is not an
    /// `http://` URL (this build has no TLS).
    pub fn new(urls: Vec<String>) -> Result<Client, Error> {
        if urls.is_empty() {
            return Err(Error::NoServer);
        }
        if urls.len() > SERVER_URLS_MAX {
            return Err(Error::InvalidUrl {
                url: urls.join(","),
                reason: format!("more than {SERVER_URLS_MAX} server URLs"),
            });
        }
        let urls = urls
            .iter()
            .map(|url| parse_base_url(url))
            .collect::<Result<Vec<_>, _>>()?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_NODE_MAX)
            .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
            .tcp_nodelay(true)
            // The API answers where it is asked and never redirects; following redirects
            // would also re-send a completion to wherever a `Location` pointed. Off, it
            // also spares reqwest parsing each request's URL again (a few % of a worker's
            // CPU per task).
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|source| Error::Transport {
                url: urls[0].to_string(),
                source,
            })?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                urls,
                current: AtomicUsize::new(0),
                request_timeout: REQUEST_TIMEOUT_DEFAULT,
            }),
        })
    }

    /// The same client with a different bound on each request other than a poll
    /// (default [`REQUEST_TIMEOUT_DEFAULT`]). Polls are bounded by their wait plus a margin.
    pub fn with_request_timeout(self, timeout: Duration) -> Client {
        let inner = Inner {
            http: self.inner.http.clone(),
            urls: self.inner.urls.clone(),
            current: AtomicUsize::new(self.inner.current.load(Ordering::Relaxed)),
            request_timeout: timeout,
        };
        Client {
            inner: Arc::new(inner),
        }
    }

    /// The node URLs this client uses, in the order given.
    pub fn urls(&self) -> Vec<String> {
        self.inner.urls.iter().map(|url| url.to_string()).collect()
    }

    /// Long-polls `queues` for at most `max_tasks` tasks, waiting up to `wait` for the first
    /// one (`POST /v1/tasks/poll`). Returns an empty list when none came in time.
    pub async fn poll(
        &self,
        queues: &[String],
        worker_id: &str,
        max_tasks: usize,
        wait: Duration,
    ) -> Result<Vec<PolledTask>, Error> {
        let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let body = json!({
            "queues": queues,
            "worker_id": worker_id,
            "max_tasks": max_tasks,
            "wait_ms": wait_ms,
        });
        let response: PollResponse = self
            .call(
                Method::POST,
                &["v1", "tasks", "poll"],
                &[],
                json_body(&body)?,
                Repeat::Safe,
                wait.saturating_add(POLL_TIMEOUT_MARGIN),
            )
            .await?;
        Ok(response.tasks)
    }

    /// Reports a task done with `output` (`POST /v1/tasks/{task_id}/complete`).
    ///
    /// A 409 ([`Error::is_stale_lease`]) means the lease was lost: the task was given to
    /// another worker or its attempt is over, and the output was not recorded.
    pub async fn complete(
        &self,
        task_id: &str,
        lease_token: &str,
        output: &Value,
    ) -> Result<(), Error> {
        self.complete_inner(task_id, lease_token, output, None)
            .await
            .map(drop)
    }

    /// Reports a task done, as [`Client::complete`], and takes up to `next.max_tasks` more
    /// tasks in the same round trip: the server keeps the tasks offered while the
    /// completion commits (the instance's next step, when it is a task of one of
    /// `next.queues`) for this caller, topped up with tasks already waiting. They are
    /// leased to the caller as polled tasks are. Empty when there were none.
    pub async fn complete_then_take(
        &self,
        task_id: &str,
        lease_token: &str,
        output: &Value,
        next: NextTasks<'_>,
    ) -> Result<Vec<PolledTask>, Error> {
        self.complete_inner(task_id, lease_token, output, Some(next))
            .await
    }

    async fn complete_inner(
        &self,
        task_id: &str,
        lease_token: &str,
        output: &Value,
        next: Option<NextTasks<'_>>,
    ) -> Result<Vec<PolledTask>, Error> {
        /// The body, borrowed: `json!` would copy the whole output first.
        #[derive(Serialize)]
        struct Completion<'a> {
            lease_token: &'a str,
            output: &'a Value,
            #[serde(skip_serializing_if = "Option::is_none")]
            next: Option<NextTasks<'a>>,
        }
        let body = Completion {
            lease_token,
            output,
            next,
        };
        let timeout = self.inner.request_timeout;
        // The lease token makes this safe to repeat: a second completion of the same
        // attempt is answered 409 at worst, never applied twice.
        let path = ["v1", "tasks", task_id, "complete"];
        let body = json_body(&body)?;
        if next.is_none() {
            return self
                .send(Method::POST, &path, &[], body, Repeat::Safe, timeout)
                .await
                .map(|_| Vec::new());
        }
        let answer: PollResponse = self
            .call(Method::POST, &path, &[], body, Repeat::Safe, timeout)
            .await?;
        Ok(answer.tasks)
    }

    /// Reports several tasks completed in one request (`POST /v1/tasks/completions`),
    /// at most [`COMPLETIONS_BATCH_MAX`]: `(task_id, lease_token, output)` each. The
    /// outer error is the request's (nothing was taken: repeat it); the inner ones are
    /// each completion's, as [`Client::complete`] would have answered them.
    pub async fn complete_many(
        &self,
        completions: &[(&str, &str, &Value)],
    ) -> Result<Vec<Result<(), Error>>, Error> {
        self.complete_many_inner(completions, None)
            .await
            .map(|(outcomes, _)| outcomes)
    }

    /// Reports several tasks completed, as [`Client::complete_many`], and takes up to
    /// `next.max_tasks` more tasks in the same round trip, as
    /// [`Client::complete_then_take`] does.
    pub async fn complete_many_then_take(
        &self,
        completions: &[(&str, &str, &Value)],
        next: NextTasks<'_>,
    ) -> Result<(Vec<Result<(), Error>>, Vec<PolledTask>), Error> {
        self.complete_many_inner(completions, Some(next)).await
    }

    async fn complete_many_inner(
        &self,
        completions: &[(&str, &str, &Value)],
        next: Option<NextTasks<'_>>,
    ) -> Result<(Vec<Result<(), Error>>, Vec<PolledTask>), Error> {
        assert!(completions.len() <= COMPLETIONS_BATCH_MAX);
        // The body and the answer are typed and borrowed: building them as `Value`s would
        // copy every output into a tree first, which was a fifth of a worker's CPU.
        #[derive(Serialize)]
        struct Item<'a> {
            task_id: &'a str,
            lease_token: &'a str,
            output: &'a Value,
        }
        #[derive(Serialize)]
        struct Batch<'a> {
            completions: Vec<Item<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            next: Option<NextTasks<'a>>,
        }
        #[derive(Deserialize)]
        struct Answer {
            results: Vec<ItemAnswer>,
            #[serde(default)]
            tasks: Vec<PolledTask>,
        }
        #[derive(Deserialize)]
        struct ItemAnswer {
            #[serde(default)]
            status: Option<u64>,
            #[serde(default)]
            error: Option<Value>,
        }
        let body = Batch {
            completions: completions
                .iter()
                .map(|(task_id, lease_token, output)| Item {
                    task_id,
                    lease_token,
                    output,
                })
                .collect(),
            next,
        };
        let timeout = self.inner.request_timeout;
        // Repeating is safe for the same reason as for one completion: lease tokens.
        let answer: Answer = self
            .call(
                Method::POST,
                &["v1", "tasks", "completions"],
                &[],
                json_body(&body)?,
                Repeat::Safe,
                timeout,
            )
            .await?;
        if answer.results.len() != completions.len() {
            return Err(Error::Protocol {
                url: "/v1/tasks/completions".into(),
                reason: format!("expected {} results", completions.len()),
            });
        }
        let outcomes = answer
            .results
            .into_iter()
            .map(|result| {
                let status = result
                    .status
                    .and_then(|s| u16::try_from(s).ok())
                    .unwrap_or(502);
                if status == 200 {
                    return Ok(());
                }
                let body = json!({ "error": result.error.unwrap_or(Value::Null) });
                let bytes = serde_json::to_vec(&body).unwrap_or_default();
                Err(Error::Api(ApiError::from_response(status, &bytes)))
            })
            .collect();
        Ok((outcomes, answer.tasks))
    }

    /// Reports a task failed (`POST /v1/tasks/{task_id}/fail`); the engine retries it
    /// according to the step's policy when `error.retryable`.
    pub async fn fail(
        &self,
        task_id: &str,
        lease_token: &str,
        error: &TaskError,
    ) -> Result<(), Error> {
        let body = json!({
            "lease_token": lease_token,
            "error": {
                "type": error.error_type,
                "message": error.message,
                "retryable": error.retryable,
            },
        });
        self.task_call(task_id, "fail", &body).await
    }

    /// Extends a task's lease (`POST /v1/tasks/{task_id}/heartbeat`).
    pub async fn heartbeat(&self, task_id: &str, lease_token: &str) -> Result<(), Error> {
        let body = json!({ "lease_token": lease_token });
        self.task_call(task_id, "heartbeat", &body).await
    }

    /// Deploys a definition's source as its next version (`POST /v1/definitions`).
    ///
    /// An invalid definition is an [`Error::Api`] with code `invalid_definition` whose
    /// `problems` give line and column of each problem.
    pub async fn deploy(&self, source: String, format: SourceFormat) -> Result<Deployed, Error> {
        let content_type = match format {
            SourceFormat::Yaml => "application/yaml",
            SourceFormat::Json => "application/json",
        };
        let body = Body::Bytes {
            content_type,
            bytes: source.into_bytes(),
        };
        let timeout = self.inner.request_timeout;
        self.call(
            Method::POST,
            &["v1", "definitions"],
            &[],
            body,
            Repeat::Unsafe,
            timeout,
        )
        .await
    }

    /// The latest version of every definition (`GET /v1/definitions`).
    pub async fn definitions(&self) -> Result<Vec<DefinitionSummary>, Error> {
        let list: DefinitionList = self.get(&["v1", "definitions"], &[]).await?;
        Ok(list.definitions)
    }

    /// One definition with its source: the latest version, or `version`
    /// (`GET /v1/definitions/{name}`).
    pub async fn definition(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<DefinitionSource, Error> {
        let query: Vec<(&str, String)> = version
            .map(|version| ("version", version.to_string()))
            .into_iter()
            .collect();
        self.get(&["v1", "definitions", name], &query).await
    }

    /// Starts an instance (`POST /v1/instances`). With an `id` the call is idempotent:
    /// starting the same id again returns the existing instance with `created == false`.
    pub async fn start(&self, request: &StartRequest) -> Result<Started, Error> {
        let repeat = if request.id.is_some() {
            Repeat::Safe
        } else {
            Repeat::Unsafe
        };
        let response = self
            .send(
                Method::POST,
                &["v1", "instances"],
                &[],
                json_body(request)?,
                repeat,
                self.inner.request_timeout,
            )
            .await?;
        let created = response.status == StatusCode::CREATED;
        let mut started: Started = decode(response)?;
        started.created = created;
        Ok(started)
    }

    /// One instance (`GET /v1/instances/{id}`).
    pub async fn instance(&self, id: &str) -> Result<Instance, Error> {
        self.get(&["v1", "instances", id], &[]).await
    }

    /// One page of instances matching `filter` (`GET /v1/instances`), newest first.
    pub async fn instances(&self, filter: &InstanceFilter) -> Result<InstancePage, Error> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(status) = &filter.status {
            query.push(("status", status.clone()));
        }
        if let Some(definition) = &filter.definition {
            query.push(("definition", definition.clone()));
        }
        if let Some(limit) = filter.limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = &filter.cursor {
            query.push(("cursor", cursor.clone()));
        }
        self.get(&["v1", "instances"], &query).await
    }

    /// An instance's history, oldest event first (`GET /v1/instances/{id}/history`).
    pub async fn history(&self, id: &str) -> Result<Vec<Event>, Error> {
        let history: History = self.get(&["v1", "instances", id, "history"], &[]).await?;
        Ok(history.events)
    }

    /// Cancels an instance (`POST /v1/instances/{id}/cancel`) and returns it; the same as
    /// [`cancel_by`](Client::cancel_by) without saying who asked.
    pub async fn cancel(&self, id: &str) -> Result<Instance, Error> {
        self.cancel_by(id, None).await
    }

    /// Cancels an instance gracefully (`POST /v1/instances/{id}/cancel`) and returns it: its
    /// completed steps' compensations run first (the status is `compensating` meanwhile), then
    /// it ends `cancelled`. `by` names who asked in the history (the server's default when
    /// `None`). An instance that has ended is an [`Error::Api`] with status 409.
    ///
    /// Like every operation on an instance, the request is not repeated where it may have
    /// reached a node (see [`Client`]): after an ambiguous failure, read the instance to
    /// learn whether it took effect.
    pub async fn cancel_by(&self, id: &str, by: Option<&str>) -> Result<Instance, Error> {
        let request = OperationRequest {
            by,
            ..OperationRequest::default()
        };
        self.operation(id, "cancel", &request).await
    }

    /// Ends an instance at once, without compensation (`POST /v1/instances/{id}/terminate`),
    /// and returns it (`terminated`). `reason` is recorded in the history and the instance's
    /// error (the server's default when `None`). An ended instance is a 409.
    pub async fn terminate(
        &self,
        id: &str,
        by: Option<&str>,
        reason: Option<&str>,
    ) -> Result<Instance, Error> {
        let request = OperationRequest {
            by,
            reason,
            from_step: None,
        };
        self.operation(id, "terminate", &request).await
    }

    /// Pauses a running instance (`POST /v1/instances/{id}/pause`): no new attempt starts until
    /// it is resumed; attempts in flight finish. Returns it (`paused`); 409 when it is not
    /// running.
    pub async fn pause(&self, id: &str, by: Option<&str>) -> Result<Instance, Error> {
        let request = OperationRequest {
            by,
            ..OperationRequest::default()
        };
        self.operation(id, "pause", &request).await
    }

    /// Resumes a paused instance (`POST /v1/instances/{id}/resume`) and returns it; 409 when
    /// it is not paused.
    pub async fn resume(&self, id: &str, by: Option<&str>) -> Result<Instance, Error> {
        let request = OperationRequest {
            by,
            ..OperationRequest::default()
        };
        self.operation(id, "resume", &request).await
    }

    /// Resumes a `failed` instance from its failed step (`POST /v1/instances/{id}/retry`) and
    /// returns it; 409 for an instance in another status.
    pub async fn retry(&self, id: &str, by: Option<&str>) -> Result<Instance, Error> {
        let request = OperationRequest {
            by,
            ..OperationRequest::default()
        };
        self.operation(id, "retry", &request).await
    }

    /// Runs an ended instance again from step `from_step` (`POST /v1/instances/{id}/rerun`)
    /// and returns it; 409 when it has not ended, 400 `invalid_request` for an unknown step.
    pub async fn rerun(
        &self,
        id: &str,
        from_step: &str,
        by: Option<&str>,
    ) -> Result<Instance, Error> {
        let request = OperationRequest {
            by,
            reason: None,
            from_step: Some(from_step),
        };
        self.operation(id, "rerun", &request).await
    }

    /// Starts a new instance with the same definition version and input as instance `id`
    /// (`POST /v1/instances/{id}/restart`) and returns the NEW instance; its
    /// [`Instance::restarted_from`] is `id`.
    pub async fn restart(&self, id: &str, by: Option<&str>) -> Result<Instance, Error> {
        let request = OperationRequest {
            by,
            ..OperationRequest::default()
        };
        self.operation(id, "restart", &request).await
    }

    /// Delivers signal `name` with `payload` to an instance
    /// (`POST /v1/instances/{id}/signals/{name}`) and returns the instance. The signal is kept
    /// until a `wait` step takes it. Not repeated where it may have reached a node: a repeat
    /// would deliver the signal twice.
    pub async fn signal(&self, id: &str, name: &str, payload: &Value) -> Result<Instance, Error> {
        let timeout = self.inner.request_timeout;
        self.call(
            Method::POST,
            &["v1", "instances", id, "signals", name],
            &[],
            json_body(payload)?,
            Repeat::Unsafe,
            timeout,
        )
        .await
    }

    /// Open human tasks, optionally only an assignee's or a group's (`GET /v1/human-tasks`).
    pub async fn human_tasks(
        &self,
        assignee: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<crate::wire::HumanTask>, Error> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(assignee) = assignee {
            query.push(("assignee", assignee.to_string()));
        }
        if let Some(group) = group {
            query.push(("group", group.to_string()));
        }
        let list: crate::wire::HumanTaskList = self.get(&["v1", "human-tasks"], &query).await?;
        Ok(list.tasks)
    }

    /// Completes a human task with form data (`POST /v1/human-tasks/{task_id}/complete`);
    /// data that does not match the task's schema is refused with 422 `invalid_data`.
    pub async fn complete_human_task(
        &self,
        task_id: &str,
        by: &str,
        data: &Value,
    ) -> Result<(), Error> {
        let timeout = self.inner.request_timeout;
        let _: Value = self
            .call(
                Method::POST,
                &["v1", "human-tasks", task_id, "complete"],
                &[],
                json_body(&json!({ "by": by, "data": data }))?,
                Repeat::Unsafe,
                timeout,
            )
            .await?;
        Ok(())
    }

    /// `POST /v1/instances/{id}/{action}` with `request` as the body. None of these is
    /// idempotent (a repeated cancel or pause is a 409, a repeated restart starts another
    /// instance), so none is repeated where it may have reached a node.
    async fn operation(
        &self,
        id: &str,
        action: &str,
        request: &OperationRequest<'_>,
    ) -> Result<Instance, Error> {
        let timeout = self.inner.request_timeout;
        self.call(
            Method::POST,
            &["v1", "instances", id, action],
            &[],
            json_body(request)?,
            Repeat::Unsafe,
            timeout,
        )
        .await
    }

    /// The cluster as the answering node sees it (`GET /v1/cluster`): nodes, their
    /// heartbeats, roles and partitions, and every partition's lease and epoch.
    pub async fn cluster_status(&self) -> Result<Value, Error> {
        self.get(&["v1", "cluster"], &[]).await
    }

    /// Asks a node to hand its partitions over to the others (`POST /v1/nodes/{id}/drain`),
    /// or, with `draining` false, to take partitions again (`…/undrain`). Safe to repeat.
    pub async fn drain(&self, node_id: &str, draining: bool) -> Result<(), Error> {
        let timeout = self.inner.request_timeout;
        let action = if draining { "drain" } else { "undrain" };
        let _: Value = self
            .call(
                Method::POST,
                &["v1", "nodes", node_id, action],
                &[],
                Body::Empty,
                Repeat::Safe,
                timeout,
            )
            .await?;
        Ok(())
    }

    /// Asks the current node whether it is alive (`GET /healthz`).
    pub async fn health(&self) -> Result<(), Error> {
        let timeout = self.inner.request_timeout;
        self.send(
            Method::GET,
            &["healthz"],
            &[],
            Body::Empty,
            Repeat::Safe,
            timeout,
        )
        .await
        .map(drop)
    }

    async fn task_call<B: Serialize + ?Sized>(
        &self,
        task_id: &str,
        action: &str,
        body: &B,
    ) -> Result<(), Error> {
        let timeout = self.inner.request_timeout;
        // The lease token makes these calls safe to repeat: a second completion of the same
        // attempt is answered 409 at worst, never applied twice.
        self.send(
            Method::POST,
            &["v1", "tasks", task_id, action],
            &[],
            json_body(body)?,
            Repeat::Safe,
            timeout,
        )
        .await
        .map(drop)
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &[&str],
        query: &[(&str, String)],
    ) -> Result<T, Error> {
        let timeout = self.inner.request_timeout;
        self.call(Method::GET, path, query, Body::Empty, Repeat::Safe, timeout)
            .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Body,
        repeat: Repeat,
        timeout: Duration,
    ) -> Result<T, Error> {
        let response = self
            .send(method, path, query, body, repeat, timeout)
            .await?;
        decode(response)
    }

    /// Sends one request, moving on to the next node where that is safe, and turns a
    /// non-2xx answer into [`Error::Api`].
    async fn send(
        &self,
        method: Method,
        path: &[&str],
        query: &[(&str, String)],
        body: Body,
        repeat: Repeat,
        timeout: Duration,
    ) -> Result<Response, Error> {
        let urls = &self.inner.urls;
        let first = self.inner.current.load(Ordering::Relaxed);
        let mut last_error = None;
        for offset in 0..urls.len() {
            let index = (first + offset) % urls.len();
            let url = endpoint(&urls[index], path, query);
            let mut request = self
                .inner
                .http
                .request(method.clone(), url.clone())
                .timeout(timeout);
            if let Body::Bytes {
                content_type,
                bytes,
            } = &body
            {
                request = request
                    .header(reqwest::header::CONTENT_TYPE, *content_type)
                    .body(bytes.clone());
            }
            let result = match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    match response.bytes().await {
                        Ok(bytes) => Ok((status, bytes.to_vec())),
                        Err(source) => Err(source),
                    }
                }
                Err(source) => Err(source),
            };
            let next_node_allowed = match &result {
                // A refused or timed-out connect surely did not reach the server.
                Err(source) => source.is_connect() || repeat == Repeat::Safe,
                // 503: the node says it cannot handle the request now, e.g. while starting.
                Ok((status, _)) if *status == StatusCode::SERVICE_UNAVAILABLE => true,
                Ok((status, _)) => status.is_server_error() && repeat == Repeat::Safe,
            };
            let error = match result {
                Ok((status, bytes)) if status.is_success() => {
                    self.inner.current.store(index, Ordering::Relaxed);
                    return Ok(Response { status, url, bytes });
                }
                Ok((status, bytes)) => Error::Api(ApiError::from_response(status.as_u16(), &bytes)),
                Err(source) => Error::Transport {
                    url: url.to_string(),
                    source,
                },
            };
            if !next_node_allowed {
                self.inner.current.store(index, Ordering::Relaxed);
                return Err(error);
            }
            tracing::debug!(%url, %error, "node failed, trying the next");
            last_error = Some(error);
        }
        // Start the next call on the node after the one that failed first, so that a dead
        // node is not the first choice of every call.
        self.inner
            .current
            .store((first + 1) % urls.len(), Ordering::Relaxed);
        Err(last_error.unwrap_or(Error::NoServer))
    }
}

fn json_body<T: Serialize + ?Sized>(value: &T) -> Result<Body, Error> {
    let bytes = serde_json::to_vec(value).map_err(|error| Error::Protocol {
        url: String::new(),
        reason: format!("cannot encode the request body: {error}"),
    })?;
    Ok(Body::Bytes {
        content_type: "application/json",
        bytes,
    })
}

fn decode<T: DeserializeOwned>(response: Response) -> Result<T, Error> {
    serde_json::from_slice(&response.bytes).map_err(|error| Error::Protocol {
        url: response.url.to_string(),
        reason: format!(
            "status {} with an unexpected body: {error}",
            response.status
        ),
    })
}

fn parse_base_url(text: &str) -> Result<Url, Error> {
    let invalid = |reason: String| Error::InvalidUrl {
        url: text.to_owned(),
        reason,
    };
    let trimmed = text.trim();
    // A bare `host:port` is accepted as `http://host:port`, the common way to name a node.
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let url = Url::parse(&with_scheme).map_err(|error| invalid(error.to_string()))?;
    if url.scheme() != "http" {
        return Err(invalid(format!(
            "scheme {:?} is not supported, use http://",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host".into()));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a server URL takes no query or fragment".into()));
    }
    Ok(url)
}

/// `base` with `path` appended segment by segment (each percent-encoded, so that an id with
/// a `/` stays one segment) and `query` set.
fn endpoint(base: &Url, path: &[&str], query: &[(&str, String)]) -> Url {
    let mut url = base.clone();
    if let Ok(mut segments) = url.path_segments_mut() {
        segments.pop_if_empty().extend(path);
    }
    if !query.is_empty() {
        url.query_pairs_mut()
            .extend_pairs(query.iter().map(|(key, value)| (*key, value.as_str())));
    }
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_endpoint(base: &str, path: &[&str], query: &[(&str, String)], expected: &str) {
        let base = parse_base_url(base).expect("valid base");
        assert_eq!(endpoint(&base, path, query).as_str(), expected);
    }

    #[test]
    fn endpoints() {
        // Goal: paths and queries are built safely from untrusted ids; method: table.
        check_endpoint(
            "http://127.0.0.1:7600",
            &["v1", "instances", "i-1"],
            &[],
            "http://127.0.0.1:7600/v1/instances/i-1",
        );
        check_endpoint(
            "http://n1:7600/weir/",
            &["v1", "instances", "a/b c", "history"],
            &[],
            "http://n1:7600/weir/v1/instances/a%2Fb%20c/history",
        );
        check_endpoint(
            "127.0.0.1:7600",
            &["v1", "instances"],
            &[("status", "failed".into()), ("cursor", "x&y=z".into())],
            "http://127.0.0.1:7600/v1/instances?status=failed&cursor=x%26y%3Dz",
        );
    }

    #[test]
    fn base_urls() {
        // Goal: only usable node URLs are accepted.
        assert!(parse_base_url("http://localhost:7600").is_ok());
        assert!(parse_base_url(" localhost:7600 ").is_ok());
        for bad in [
            "https://n1:7600",
            "http://",
            "ftp://x",
            "http://n1:7600/?a=b",
            "::",
        ] {
            assert!(
                matches!(parse_base_url(bad), Err(Error::InvalidUrl { .. })),
                "{bad}"
            );
        }
        assert!(matches!(Client::new(Vec::new()), Err(Error::NoServer)));
    }
}
