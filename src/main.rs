//! The `duplex` binary: parses the command line and hands it to `duplex::cli`.

use clap::Parser;
use std::process::ExitCode;

// Every change event is a tree of small strings, built on one thread and freed on
// another: glibc's allocator spent 30-40% of duplex's CPU on them during a catch-up.
// Built without transparent huge pages (`no_thp`): events are small and short-lived,
// and 2 MiB pages kept whole regions resident for a few live blocks.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long, in ms, mimalloc keeps freed memory before returning it to the system.
/// Its default of 1 s keeps every batch freed in the last second resident during a
/// catch-up; measured with 200,000-row catch-ups, 100 ms took peak RSS from 91-113 MB
/// to 75-91 MB at the same CPU per row.
const ALLOCATOR_PURGE_DELAY_MS: std::os::raw::c_long = 100;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h's `mi_option_e`), which the sys
/// crate does not name: just before `mi_option_use_numa_nodes`, which it does.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // SAFETY: setting an option is not thread safe; this runs first, on the only
    // thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ALLOCATOR_PURGE_DELAY_MS) };
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

#[cfg(test)]
mod tests {
    use super::MI_OPTION_PURGE_DELAY;
    use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_use_numa_nodes};

    #[test]
    fn the_purge_delay_option_is_where_mimalloc_h_has_it() {
        assert_eq!(MI_OPTION_PURGE_DELAY, mi_option_use_numa_nodes - 1);
        // SAFETY: no other test touches mimalloc's options.
        unsafe {
            mi_option_set(MI_OPTION_PURGE_DELAY, 123);
            assert_eq!(mi_option_get(MI_OPTION_PURGE_DELAY), 123);
        }
    }
}
