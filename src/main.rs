//! `cdc-invalidator`: thin entry point; everything lives in the library (`cli`).

// Many short-lived allocations per event (decoded rows, rendered keys): jemalloc takes them
// markedly cheaper than glibc's malloc (docs/benchmarks.md, (b)).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cdc_invalidator::cli::main()
}
