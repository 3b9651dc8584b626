//! The client subcommands of `weir`: everything but `weir server`.
//!
//! Each subcommand is a thin face over [`weir_sdk::Client`]: it turns arguments into one or a few
//! API calls and prints the answer, as an aligned table or as the server's JSON.

mod cluster;
mod definitions;
mod follow;
mod instances;
mod operations;
mod table;
mod tasks;

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

/// The server URL used when neither `--server` nor `WEIR_SERVER` is given.
pub const SERVER_DEFAULT: &str = "http://127.0.0.1:7600";

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct Global {
    /// Node URL of the weir cluster. Several (comma-separated or repeated) are tried in order
    /// when one cannot be reached.
    #[arg(
        long = "server",
        env = "WEIR_SERVER",
        default_value = SERVER_DEFAULT,
        value_delimiter = ',',
        global = true,
        value_name = "URL"
    )]
    pub servers: Vec<String>,
    /// How to print results: aligned tables for people, or the server's JSON for programs.
    #[arg(long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned human-readable tables.
    Table,
    /// JSON, as the server sends it.
    Json,
}

/// The client subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a definition file locally, without a server.
    Validate(definitions::ValidateArgs),
    /// Deploy a definition file as the next version of its definition.
    Deploy(definitions::DeployArgs),
    /// List deployed definitions (the latest version of each).
    Definitions,
    /// Start an instance of a definition.
    Start(instances::StartArgs),
    /// Show one instance.
    Status(instances::IdArgs),
    /// List instances.
    List(instances::ListArgs),
    /// Show the event history of an instance.
    History(instances::IdArgs),
    /// Cancel an instance gracefully: its completed steps are undone (compensated) first.
    Cancel(operations::OperationArgs),
    /// End an instance at once, without compensation.
    Terminate(operations::TerminateArgs),
    /// Pause a running instance: no new step starts until it is resumed.
    Pause(operations::OperationArgs),
    /// Resume a paused instance.
    Resume(operations::OperationArgs),
    /// Resume a failed instance from its failed step.
    Retry(operations::OperationArgs),
    /// Run an ended instance again from a step.
    Rerun(operations::RerunArgs),
    /// Start a new instance with the same definition version and input; prints the new one.
    Restart(operations::OperationArgs),
    /// Send a signal to an instance (kept until a `wait` step takes it).
    Signal(operations::SignalArgs),
    /// Human tasks: list them, complete them.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// The cluster: nodes, heartbeats, partitions and leases.
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
    /// One node: drain it (hand its partitions over) or let it take partitions again.
    #[command(subcommand)]
    Node(cluster::NodeCommand),
}

/// Runs a client subcommand and returns the process's exit code.
pub fn run(global: Global, command: Command) -> ExitCode {
    init_logging();
    // `validate` needs neither a server nor a runtime.
    if let Command::Validate(args) = &command {
        return finish(definitions::validate(args, global.output));
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return finish(Err(anyhow::Error::new(error).context("cannot start"))),
    };
    let client = match weir_sdk::Client::new(global.servers) {
        Ok(client) => client,
        Err(error) => return finish(Err(error.into())),
    };
    let context = Context {
        client,
        output: global.output,
    };
    let result = runtime.block_on(async {
        match command {
            Command::Validate(_) => Ok(ExitCode::SUCCESS),
            Command::Deploy(args) => definitions::deploy(&context, &args).await,
            Command::Definitions => definitions::list(&context).await,
            Command::Start(args) => instances::start(&context, args).await,
            Command::Status(args) => instances::status(&context, &args).await,
            Command::List(args) => instances::list(&context, &args).await,
            Command::History(args) => instances::history(&context, &args).await,
            Command::Cancel(args) => operations::cancel(&context, &args).await,
            Command::Terminate(args) => operations::terminate(&context, &args).await,
            Command::Pause(args) => operations::pause(&context, &args).await,
            Command::Resume(args) => operations::resume(&context, &args).await,
            Command::Retry(args) => operations::retry(&context, &args).await,
            Command::Rerun(args) => operations::rerun(&context, &args).await,
            Command::Restart(args) => operations::restart(&context, &args).await,
            Command::Signal(args) => operations::signal(&context, &args).await,
            Command::Tasks(command) => tasks::run(&context, &command).await,
            Command::Cluster(command) => cluster::run_cluster(&context, &command).await,
            Command::Node(command) => cluster::run_node(&context, &command).await,
        }
    });
    finish(result)
}

/// What every client subcommand works with.
pub struct Context {
    pub client: weir_sdk::Client,
    pub output: Output,
}

/// Turns a subcommand's result into an exit code, printing its error: `error: <code>: <message>`
/// for the server's errors, the error and its causes for the others.
fn finish(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

fn describe(error: &anyhow::Error) -> String {
    // The server's errors read best as they are: `code: message`.
    if let Some(weir_sdk::Error::Api(api)) = error.downcast_ref::<weir_sdk::Error>() {
        return api.to_string();
    }
    // The first and the last cause say what failed and why; the ones between (the HTTP
    // client's layers) mostly repeat them.
    let mut causes = error.chain();
    let first = causes.next().map(ToString::to_string).unwrap_or_default();
    match causes.last().map(ToString::to_string) {
        Some(last) if !first.contains(&last) => format!("{first}: {last}"),
        _ => first,
    }
}

/// Logs go to stderr; quiet (warnings only) unless `RUST_LOG` says otherwise.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Writes `text` to stdout. A closed pipe (`weir list | head`) ends the process quietly
/// instead of panicking as `print!` would.
pub fn print_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
    if let Err(error) = written {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {error}");
        std::process::exit(1);
    }
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    print_stdout(&text);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Harness {
        #[command(flatten)]
        global: Global,
        #[command(subcommand)]
        command: Command,
    }

    fn parse(arguments: &[&str]) -> Result<Harness, clap::Error> {
        Harness::try_parse_from(std::iter::once("weir").chain(arguments.iter().copied()))
    }

    #[test]
    fn server_lists_and_global_flags() {
        // Goal: `--server` takes a comma-separated list, anywhere on the line.
        let parsed = parse(&[
            "status",
            "i1",
            "--server",
            "http://a:1,http://b:2",
            "--output",
            "json",
        ])
        .expect("valid arguments");
        assert_eq!(parsed.global.servers, vec!["http://a:1", "http://b:2"]);
        assert_eq!(parsed.global.output, Output::Json);
    }

    #[test]
    fn usage_errors() {
        // Goal: malformed arguments are clap's usage errors (exit code 2), not API calls.
        for arguments in [
            &["start", "order", "--input", "{not json"][..],
            &["start", "order", "--input", "{}", "--input-file", "x.json"],
            &["list", "--limit", "0"],
            &["status"],
            &["list", "--output", "yaml"],
            &["rerun", "i1"],
            &["terminate"],
            &["signal", "i1"],
            &["signal", "i1", "go", "--payload", "{not json"],
            &[
                "signal",
                "i1",
                "go",
                "--payload",
                "1",
                "--payload-file",
                "x.json",
            ],
        ] {
            let error = parse(arguments).expect_err("usage error");
            assert_eq!(error.exit_code(), 2, "{arguments:?}");
        }
    }

    #[test]
    fn operations_parse() {
        // Goal: every operation takes its id, `--by` and its own flags; method: one line each.
        let parsed = parse(&["terminate", "i1", "--reason", "stuck", "--by", "alice"])
            .expect("valid arguments");
        let Command::Terminate(args) = parsed.command else {
            panic!("not terminate: {:?}", parsed.command);
        };
        assert_eq!(args.reason.as_deref(), Some("stuck"));
        assert_eq!(args.by.who(), "alice");
        let parsed = parse(&["rerun", "i1", "--from-step", "charge"]).expect("valid arguments");
        let Command::Rerun(args) = parsed.command else {
            panic!("not rerun: {:?}", parsed.command);
        };
        assert_eq!(
            (args.id.as_str(), args.from_step.as_str()),
            ("i1", "charge")
        );
        let parsed = parse(&["signal", "i1", "approve", "--payload", r#"{"ok":true}"#])
            .expect("valid arguments");
        let Command::Signal(args) = parsed.command else {
            panic!("not signal: {:?}", parsed.command);
        };
        assert_eq!(args.name, "approve");
        assert_eq!(args.payload, Some(serde_json::json!({"ok": true})));
        for command in ["cancel", "pause", "resume", "retry", "restart"] {
            let parsed = parse(&[command, "i1", "--by", "bob"]).expect("valid arguments");
            assert!(
                format!("{:?}", parsed.command).contains("\"bob\""),
                "{command}"
            );
        }
    }

    #[test]
    fn api_errors_read_as_code_and_message() {
        let api = weir_sdk::ApiError {
            status: 404,
            code: "not_found".into(),
            message: "no instance i9".into(),
            problems: Vec::new(),
            body: serde_json::Value::Null,
        };
        let error = anyhow::Error::new(weir_sdk::Error::Api(api));
        assert_eq!(describe(&error), "not_found: no instance i9");
    }
}
