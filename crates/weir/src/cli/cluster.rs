//! `weir cluster status` and `weir node drain|undrain`: the cluster, for operators.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::table::Table;
use super::{print_json, print_stdout, Context, Output};

/// `weir cluster …`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Nodes (heartbeats, roles, partitions) and every partition's lease and epoch.
    Status(StatusArgs),
}

/// Arguments of `weir cluster status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Also list every partition with its owner, epoch and lease expiry.
    #[arg(long)]
    pub partitions: bool,
}

/// `weir node …`.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Hand a node's partitions over to the others now (before stopping it, say).
    Drain(NodeArgs),
    /// Let a drained node take partitions again.
    Undrain(NodeArgs),
}

/// A node's name.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The node's id (`--node-id` of its server).
    pub node_id: String,
}

/// Runs `weir cluster …`.
pub async fn run_cluster(context: &Context, command: &ClusterCommand) -> anyhow::Result<ExitCode> {
    let ClusterCommand::Status(args) = command;
    let status = context.client.cluster_status().await?;
    if context.output == Output::Json {
        print_json(&status)?;
        return Ok(ExitCode::SUCCESS);
    }
    let empty = Vec::new();
    let nodes = status["nodes"].as_array().unwrap_or(&empty);
    let mut table = Table::new(&[
        "NODE",
        "ROLE",
        "STATE",
        "HEARTBEAT",
        "PARTITIONS",
        "PLACED",
        "URL",
    ]);
    for node in nodes {
        let state = match (node["alive"].as_bool(), node["draining"].as_bool()) {
            (Some(true), Some(true)) => "draining",
            (Some(true), _) => "alive",
            _ => "dead",
        };
        table.row(vec![
            text(&node["node_id"]),
            text(&node["role"]),
            state.to_string(),
            format!("{} ms ago", node["heartbeat_age_ms"].as_u64().unwrap_or(0)),
            node["partitions"]
                .as_array()
                .map_or(0, Vec::len)
                .to_string(),
            text(&node["placed"]),
            text(&node["url"]),
        ]);
    }
    let partitions = status["partitions"].as_array().unwrap_or(&empty);
    let unowned = partitions
        .iter()
        .filter(|p| p["owner"].as_str().is_none_or(str::is_empty))
        .count();
    let mut out = format!(
        "answered by {} at {}\n{}{} partitions, {} without an owner\n",
        text(&status["node_id"]),
        text(&status["store_time"]),
        table.render(),
        partitions.len(),
        unowned
    );
    if args.partitions {
        let mut table = Table::new(&["PARTITION", "OWNER", "EPOCH", "EXPIRES IN", "PLACED ON"]);
        for p in partitions {
            table.row(vec![
                text(&p["partition"]),
                text(&p["owner"]),
                text(&p["epoch"]),
                format!("{} ms", p["expires_in_ms"].as_u64().unwrap_or(0)),
                text(&p["placed_on"]),
            ]);
        }
        out.push_str(&table.render());
    }
    print_stdout(&out);
    Ok(ExitCode::SUCCESS)
}

/// Runs `weir node …`.
pub async fn run_node(context: &Context, command: &NodeCommand) -> anyhow::Result<ExitCode> {
    let (args, draining) = match command {
        NodeCommand::Drain(args) => (args, true),
        NodeCommand::Undrain(args) => (args, false),
    };
    context.client.drain(&args.node_id, draining).await?;
    if context.output == Output::Json {
        print_json(&serde_json::json!({ "node_id": args.node_id, "draining": draining }))?;
    } else if draining {
        print_stdout(&format!(
            "{} is draining: its partitions move to the other nodes within a heartbeat or two\n",
            args.node_id
        ));
    } else {
        print_stdout(&format!("{} takes partitions again\n", args.node_id));
    }
    Ok(ExitCode::SUCCESS)
}

fn text(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}
