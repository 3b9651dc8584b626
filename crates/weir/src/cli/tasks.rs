//! `weir tasks list` and `weir tasks complete`: human tasks, for people at a terminal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::instances::{parse_json, read_json_file};
use super::operations::ByArgs;
use super::table::Table;
use super::{print_json, print_stdout, Context, Output};

/// `weir tasks …`.
#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List open human tasks.
    List(ListArgs),
    /// Complete a human task with form data.
    Complete(CompleteArgs),
}

/// Arguments of `weir tasks list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only tasks assigned to this person.
    #[arg(long, value_name = "A")]
    pub assignee: Option<String>,
    /// Only tasks of this group.
    #[arg(long, value_name = "G")]
    pub group: Option<String>,
}

/// Arguments of `weir tasks complete`.
#[derive(Debug, Args)]
pub struct CompleteArgs {
    /// The task's id (from `weir tasks list`).
    pub task_id: String,
    /// The form data, as JSON (checked against the task's schema).
    #[arg(long, value_name = "JSON", value_parser = parse_json, conflicts_with = "data_file")]
    pub data: Option<Value>,
    /// Read the form data from a JSON file (`-` for stdin).
    #[arg(long, value_name = "FILE")]
    pub data_file: Option<PathBuf>,
    #[command(flatten)]
    pub by: ByArgs,
}

/// Runs a `weir tasks` subcommand.
pub async fn run(context: &Context, command: &TasksCommand) -> anyhow::Result<ExitCode> {
    match command {
        TasksCommand::List(args) => {
            let tasks = context
                .client
                .human_tasks(args.assignee.as_deref(), args.group.as_deref())
                .await?;
            if context.output == Output::Json {
                print_json(&serde_json::json!({ "tasks": tasks }))?;
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = Table::new(&["TASK", "TITLE", "ASSIGNEE", "GROUP", "INSTANCE"]);
            for task in &tasks {
                let title = match &task.title {
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                table.row(vec![
                    task.task_id.clone(),
                    title,
                    task.assignee.clone().unwrap_or_default(),
                    task.group.clone().unwrap_or_default(),
                    task.instance_id.clone(),
                ]);
            }
            print_stdout(&table.render());
            Ok(ExitCode::SUCCESS)
        }
        TasksCommand::Complete(args) => {
            let data = match (&args.data, &args.data_file) {
                (Some(data), _) => data.clone(),
                (None, Some(path)) => read_json_file(path, "form data")?,
                (None, None) => Value::Object(Default::default()),
            };
            context
                .client
                .complete_human_task(&args.task_id, &args.by.who(), &data)
                .await?;
            if context.output == Output::Json {
                print_json(&serde_json::json!({ "task_id": args.task_id, "completed": true }))?;
            } else {
                print_stdout(&format!("completed {}\n", args.task_id));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
