//! `weir cancel`, `terminate`, `pause`, `resume`, `retry`, `rerun`, `restart` and `signal`: the
//! operations on one instance.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;
use weir_sdk::Instance;

use super::instances::{describe_instance, parse_json, read_json_file};
use super::{print_json, print_stdout, Context, Output};

/// Who is named as having asked when neither `--by` nor `USER` says.
pub const BY_DEFAULT: &str = "cli";

/// `--by`, taken by every operation.
#[derive(Debug, Args)]
pub struct ByArgs {
    /// Who asks, recorded in the instance's history (default: the `USER` environment
    /// variable, else "cli").
    #[arg(long, value_name = "WHO")]
    pub by: Option<String>,
}

impl ByArgs {
    /// `--by`, else `USER` when set and not blank, else [`BY_DEFAULT`].
    pub fn who(&self) -> String {
        who(self.by.as_deref(), std::env::var("USER").ok().as_deref())
    }
}

fn who(by: Option<&str>, user: Option<&str>) -> String {
    by.or(user.filter(|user| !user.trim().is_empty()))
        .unwrap_or(BY_DEFAULT)
        .to_owned()
}

/// An instance id and who asks.
#[derive(Debug, Args)]
pub struct OperationArgs {
    /// The instance's id.
    pub id: String,
    #[command(flatten)]
    pub by: ByArgs,
}

/// Arguments of `weir terminate`.
#[derive(Debug, Args)]
pub struct TerminateArgs {
    /// The instance's id.
    pub id: String,
    /// Why, recorded in the history and the instance's error.
    #[arg(long, value_name = "R")]
    pub reason: Option<String>,
    #[command(flatten)]
    pub by: ByArgs,
}

/// Arguments of `weir rerun`.
#[derive(Debug, Args)]
pub struct RerunArgs {
    /// The instance's id.
    pub id: String,
    /// The step to run again from; every later step runs again too.
    #[arg(long, value_name = "STEP")]
    pub from_step: String,
    #[command(flatten)]
    pub by: ByArgs,
}

/// Arguments of `weir signal`.
#[derive(Debug, Args)]
pub struct SignalArgs {
    /// The instance's id.
    pub id: String,
    /// The signal's name, as a `wait` step names it.
    pub name: String,
    /// The signal's payload, as JSON (default `null`).
    #[arg(long, value_name = "JSON", value_parser = parse_json, conflicts_with = "payload_file")]
    pub payload: Option<Value>,
    /// Read the payload from a JSON file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// Accepted like every operation's `--by`, but not sent: the API records no sender for a
    /// signal.
    #[arg(long, value_name = "WHO")]
    pub by: Option<String>,
}

pub async fn cancel(context: &Context, args: &OperationArgs) -> anyhow::Result<ExitCode> {
    let instance = context
        .client
        .cancel_by(&args.id, Some(&args.by.who()))
        .await?;
    match context.output {
        Output::Table => print_stdout(&format!("{} is {}\n", instance.id, instance.status)),
        Output::Json => print_json(&instance)?,
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn terminate(context: &Context, args: &TerminateArgs) -> anyhow::Result<ExitCode> {
    let instance = context
        .client
        .terminate(&args.id, Some(&args.by.who()), args.reason.as_deref())
        .await?;
    show(context, &instance)
}

pub async fn pause(context: &Context, args: &OperationArgs) -> anyhow::Result<ExitCode> {
    let instance = context.client.pause(&args.id, Some(&args.by.who())).await?;
    show(context, &instance)
}

pub async fn resume(context: &Context, args: &OperationArgs) -> anyhow::Result<ExitCode> {
    let instance = context
        .client
        .resume(&args.id, Some(&args.by.who()))
        .await?;
    show(context, &instance)
}

pub async fn retry(context: &Context, args: &OperationArgs) -> anyhow::Result<ExitCode> {
    let instance = context.client.retry(&args.id, Some(&args.by.who())).await?;
    show(context, &instance)
}

pub async fn rerun(context: &Context, args: &RerunArgs) -> anyhow::Result<ExitCode> {
    let instance = context
        .client
        .rerun(&args.id, &args.from_step, Some(&args.by.who()))
        .await?;
    show(context, &instance)
}

/// Prints the NEW instance; in a table its id comes first.
pub async fn restart(context: &Context, args: &OperationArgs) -> anyhow::Result<ExitCode> {
    let instance = context
        .client
        .restart(&args.id, Some(&args.by.who()))
        .await?;
    if context.output == Output::Table {
        eprintln!("restarted {} as {}", args.id, instance.id);
    }
    show(context, &instance)
}

pub async fn signal(context: &Context, args: &SignalArgs) -> anyhow::Result<ExitCode> {
    let payload = match (&args.payload, &args.payload_file) {
        (Some(payload), _) => payload.clone(),
        (None, Some(path)) => read_json_file(path, "payload")?,
        (None, None) => Value::Null,
    };
    let instance = context
        .client
        .signal(&args.id, &args.name, &payload)
        .await?;
    show(context, &instance)
}

fn show(context: &Context, instance: &Instance) -> anyhow::Result<ExitCode> {
    match context.output {
        Output::Table => print_stdout(&describe_instance(instance)),
        Output::Json => print_json(instance)?,
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_asks() {
        // Goal: `--by` wins, then a non-blank USER, then "cli".
        assert_eq!(who(Some("alice"), Some("bob")), "alice");
        assert_eq!(who(None, Some("bob")), "bob");
        assert_eq!(who(None, Some(" ")), "cli");
        assert_eq!(who(None, None), "cli");
    }
}
