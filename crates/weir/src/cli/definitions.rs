//! `weir validate`, `weir deploy` and `weir definitions`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use serde_json::json;
use weir_sdk::SourceFormat;

use super::table::Table;
use super::{print_json, print_stdout, Context, Output};

/// Arguments of `weir validate`.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The definition file (YAML, or JSON).
    pub file: PathBuf,
}

/// Arguments of `weir deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The definition file: sent as JSON if its name ends in `.json`, as YAML otherwise.
    pub file: PathBuf,
}

/// Parses the file locally. Problems go to stderr as `FILE:LINE:COLUMN: message`, the way
/// compilers report them, so that editors can jump to each.
pub fn validate(args: &ValidateArgs, output: Output) -> anyhow::Result<ExitCode> {
    let source = read(&args.file)?;
    let file = args.file.display().to_string();
    match weir_model::dsl::parse(&source) {
        Ok(definition) => {
            match output {
                Output::Table => print_stdout(&format!(
                    "{file}: ok (definition {}, {} steps)\n",
                    definition.name,
                    definition.steps.len()
                )),
                Output::Json => print_json(&json!({
                    "file": file,
                    "valid": true,
                    "name": definition.name,
                    "steps": definition.steps.len(),
                }))?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(problems) => {
            let problems: Vec<weir_sdk::Problem> = problems
                .into_iter()
                .map(|problem| weir_sdk::Problem {
                    line: problem.line,
                    column: problem.column,
                    message: problem.message,
                })
                .collect();
            match output {
                Output::Table => print_problems(&file, &problems),
                Output::Json => print_json(&json!({
                    "file": file,
                    "valid": false,
                    "problems": problems,
                }))?,
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Sends the file to the server; an invalid definition is reported like `validate` does.
pub async fn deploy(context: &Context, args: &DeployArgs) -> anyhow::Result<ExitCode> {
    let source = read(&args.file)?;
    let file = args.file.display().to_string();
    let is_json = args
        .file
        .extension()
        .is_some_and(|extension| extension.eq_ignore_ascii_case("json"));
    let format = if is_json {
        SourceFormat::Json
    } else {
        SourceFormat::Yaml
    };
    match context.client.deploy(source, format).await {
        Ok(deployed) => {
            match context.output {
                Output::Table => print_stdout(&format!(
                    "deployed {} version {}\n",
                    deployed.name, deployed.version
                )),
                Output::Json => print_json(&deployed)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(weir_sdk::Error::Api(api)) if !api.problems.is_empty() => {
            match context.output {
                Output::Table => print_problems(&file, &api.problems),
                Output::Json => print_json(&api.body)?,
            }
            Ok(ExitCode::FAILURE)
        }
        Err(error) => Err(error.into()),
    }
}

/// Lists the latest version of every definition.
pub async fn list(context: &Context) -> anyhow::Result<ExitCode> {
    let definitions = context.client.definitions().await?;
    match context.output {
        Output::Json => print_json(&json!({ "definitions": definitions }))?,
        Output::Table if definitions.is_empty() => eprintln!("no definitions deployed"),
        Output::Table => {
            let mut table = Table::new(&["NAME", "VERSION", "CREATED"]);
            for definition in definitions {
                table.row(vec![
                    definition.name,
                    definition.version.to_string(),
                    definition.created_at,
                ]);
            }
            print_stdout(&table.render());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn print_problems(file: &str, problems: &[weir_sdk::Problem]) {
    for line in problem_lines(file, problems) {
        eprintln!("{line}");
    }
}

/// `FILE:LINE:COLUMN: message`, or `FILE: message` for a problem without a position.
fn problem_lines(file: &str, problems: &[weir_sdk::Problem]) -> Vec<String> {
    problems
        .iter()
        .map(|problem| {
            if problem.line == 0 {
                format!("{file}: {}", problem.message)
            } else {
                format!(
                    "{file}:{}:{}: {}",
                    problem.line, problem.column, problem.message
                )
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_read_like_compiler_errors() {
        let problems = [
            weir_sdk::Problem {
                line: 3,
                column: 7,
                message: "unknown key \"tsk\"".into(),
            },
            weir_sdk::Problem {
                line: 0,
                column: 0,
                message: "the document is empty".into(),
            },
        ];
        assert_eq!(
            problem_lines("order.yaml", &problems),
            vec![
                "order.yaml:3:7: unknown key \"tsk\"",
                "order.yaml: the document is empty"
            ]
        );
    }
}
