//! The `lifeboat` binary: parse arguments, run the command, map errors to exit codes.

use std::process::ExitCode;

use clap::Parser;
use lifeboat::cli::Cli;
use lifeboat::error::{format_chain, Error, ErrorKind};

fn main() -> ExitCode {
    keep_freed_buffers();
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

/// The data path allocates and frees buffers of about a chunk (1 MiB by default) per chunk:
/// NBD replies, compressed objects, decompressed chunks. With glibc's defaults each of them is
/// above the (dynamic) mmap threshold or is trimmed back to the kernel when freed, so every page
/// of every buffer is a fresh, zeroed page fault (≈ 60 % of the process's page faults in a full
/// backup; see docs/BENCHMARKS.md). Serve allocations below 32 MiB from the heap and trim only
/// above 64 MiB free, so that freed buffers are reused. The same thresholds are given to the
/// qemu-nbd processes Lifeboat starts.
///
/// And use one arena: with glibc's default (up to 8 per core) each worker thread frees its
/// chunk buffers into its own arena, where only that arena's next allocations can reuse them,
/// so the retained free memory grew with the number of threads (instant-restore with its
/// 64-chunk cache peaked at 159–224 MiB, 97 MiB with one arena: its cache plus ≈ 35 MiB). The
/// contention this could add is negligible here: a few chunk-sized allocations per chunk, and
/// small ones come from each thread's cache without the arena lock.
#[allow(unsafe_code)]
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes glibc allocator parameters; it is called first thing in
        // main, before any other thread exists or any allocation depends on the old values.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
