//! The `seq` workload for Restate: handler `Seq/run` takes `{"n": i, "steps": K}` and runs K
//! journaled no-op steps with `ctx.run`, then returns `{"n": i}`. Each `ctx.run` result is
//! written to Restate's log before the handler goes on, which is what makes it a durable step.
//!
//! Usage: weir-peer-restate-service [LISTEN_ADDR]   (default 127.0.0.1:9080)

use restate_sdk::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Input {
    n: i64,
    #[serde(default = "default_steps")]
    steps: u32,
}

fn default_steps() -> u32 {
    3
}

#[derive(Serialize, Deserialize)]
struct Output {
    n: i64,
}

struct Seq;

#[restate_sdk::service]
impl Seq {
    #[handler]
    async fn run(&self, ctx: Context<'_>, input: Json<Input>) -> Result<Json<Output>, HandlerError> {
        let input = input.into_inner();
        for i in 0..input.steps {
            ctx.run(|| async { Ok(()) }).name(format!("step{i}")).await?;
        }
        Ok(Json(Output { n: input.n }))
    }
}

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9080".to_string());
    HttpServer::new(Endpoint::builder().bind(Seq).build())
        .listen_and_serve(addr.parse().expect("listen address"))
        .await;
}
