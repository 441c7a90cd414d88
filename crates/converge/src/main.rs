//! The `converge` binary: `serve` runs the node daemon; every other subcommand is a client
//! of a node's REST API.

mod serve;

use clap::Parser;
use cli::{Cli, Command};

fn main() -> std::process::ExitCode {
    let args = Cli::parse();
    let json = args.client.json;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime starts");
    let result = runtime.block_on(async {
        match args.command {
            Command::Serve(serve_args) => serve::run(serve_args).await,
            command => cli::run(command, args.client).await,
        }
    });
    // A console session may leave a read of stdin pending, which nothing can cancel: the
    // command is done, so its process does not wait for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => std::process::ExitCode::from(cli::report_failure(&e, json)),
    }
}
