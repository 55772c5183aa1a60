//! `cdc-invalidator`: thin entry point; everything lives in the library (`cli`).

// Many short-lived allocations per event (decoded rows, rendered keys): jemalloc takes them
// markedly cheaper than glibc's malloc (docs/benchmarks.md, (b)).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options (`_RJEM_MALLOC_CONF` in the environment still wins, option by option).
/// One arena instead of four per CPU: an event is allocated on whichever worker thread the
/// source task runs on and freed on whichever one finishes it, and each arena keeps the pages
/// freed in it (for `dirty_decay_ms`, 10 s) up to its own peak: with the tasks moving between
/// two workers, each of their arenas held about the whole peak, and jemalloc's resident memory
/// was twice what was allocated (31 to 47 MiB for 16 MiB; one arena: 23 MiB). The daemon's
/// few busy threads allocate through their thread caches, so one arena costs no contention
/// worth measuring (docs/benchmarks.md, "Memory per queued event (hmem)").
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: &u8 = &b"narenas:1\0"[0];

fn main() -> std::process::ExitCode {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    glibc_malloc::return_large_blocks();
    cdc_invalidator::cli::main()
}

/// librdkafka (C) still allocates with glibc's malloc, and its largest blocks are fetch
/// responses (up to `fetch.max.bytes`, 2 MiB: `src/source/kafka/prefetch.rs`). glibc serves a
/// block over `M_MMAP_THRESHOLD` with a mapping of its own, returned to the system when freed,
/// but it raises that threshold to the size of every such block freed (up to 32 MiB): after the
/// first fetch response, the next ones come from the broker thread's arena, whose freed space
/// stays resident. Measured: a 20 MiB arena while catching up (docs/benchmarks.md, "Memory per
/// queued event (hmem)"). Setting the threshold fixes it at glibc's own starting value.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc_malloc {
    use std::ffi::c_int;

    /// glibc's `M_MMAP_THRESHOLD` (malloc.h).
    const M_MMAP_THRESHOLD: c_int = -3;
    /// glibc's default starting threshold.
    const THRESHOLD: c_int = 128 * 1024;

    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }

    pub fn return_large_blocks() {
        // SAFETY: mallopt only sets a parameter of glibc's allocator; it is called first thing
        // in main, before any thread that could allocate with glibc exists. A failure (0)
        // leaves glibc's default, which only costs memory.
        let _ = unsafe { mallopt(M_MMAP_THRESHOLD, THRESHOLD) };
    }
}
