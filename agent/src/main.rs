//! The `lifeboat` binary: parse arguments, run the command, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use lifeboat::cli::Cli;
use lifeboat::error::{format_chain, Error, ErrorKind};

fn main() -> ExitCode {
    let cli = Cli::parse();
    lifeboat::logging::init(cli.global.verbose, cli.global.json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lifeboat")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            r = lifeboat::commands::run(cli) => r,
            s = lifeboat::signals::interrupted() => Err(Error::new(
                ErrorKind::Interrupted,
                format!("interrupted by {s}: stopped, nothing was committed by the interrupted step"),
            )),
        }
    });
    // Give blocking workers a moment to notice; cleanup guards already ran when the future dropped.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", format_chain(&e));
            ExitCode::from(e.kind().exit_code())
        }
    }
}
