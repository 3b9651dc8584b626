//! The client subcommands of `weir`: everything but `weir server`.
//!
//! Each subcommand is a thin face over [`weir_sdk::Client`]: it turns arguments into one or a few
//! API calls and prints the answer, as an aligned table or as the server's JSON.

mod definitions;
mod follow;
mod instances;
mod table;

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
    /// Cancel a running instance.
    Cancel(instances::IdArgs),
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
            Command::Cancel(args) => instances::cancel(&context, &args).await,
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
        ] {
            let error = parse(arguments).expect_err("usage error");
            assert_eq!(error.exit_code(), 2, "{arguments:?}");
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
