//! `vlm-mesh`: the command line of the vision-language model mesh.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod generate;

#[derive(Parser)]
#[command(
    name = "vlm-mesh",
    version,
    about = "Serve LLaVA-style vision-language models as a gRPC mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run image(s) + prompt through the whole model in this process (no network): the reference
    /// the mesh must equal token for token.
    Generate(generate::GenerateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VLM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
