//! The `custos` command: the broker (`server`, `dev`), its set-up (`init`, `key rotate`),
//! and a client of the HTTP API (`secret ...`).

#![forbid(unsafe_code)]

mod admin_commands;
mod audit_commands;
mod broker;
mod cli;
mod client;
mod config;
mod logging;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command, KeyCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("custos: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };

    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("custos: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Server(arguments) => broker::server(arguments).await?,
        Command::Dev(arguments) => broker::dev(arguments).await?,
        Command::Init(arguments) => broker::init(arguments).await?,
        Command::Key {
            command: KeyCommand::Rotate(arguments),
        } => broker::rotate(arguments).await?,
        Command::Secret {
            connection,
            command,
        } => return client::run(connection, command).await,
        Command::Audit { command } => return audit_commands::run(command).await,
        Command::Token {
            connection,
            command,
        } => return admin_commands::token(connection, command).await,
        Command::Approle {
            connection,
            command,
        } => return admin_commands::approle(connection, command).await,
        Command::Lease {
            connection,
            command,
        } => return admin_commands::lease(connection, command).await,
        Command::Policy {
            connection,
            command,
        } => return admin_commands::policy(connection, command).await,
    }
    Ok(ExitCode::SUCCESS)
}
