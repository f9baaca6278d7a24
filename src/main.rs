//! The `duplex` binary: parses the command line and hands it to `duplex::cli`.

use clap::Parser;
use std::process::ExitCode;

// Every change event is a tree of small strings, built on one thread and freed on
// another: glibc's allocator spent 30-40% of duplex's CPU on them during a catch-up.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = duplex::cli::Cli::parse();
    duplex::cli::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(duplex::cli::execute(cli))
}
