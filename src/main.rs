//! `cdc-invalidator`: thin entry point; everything lives in the library (`cli`).

fn main() -> std::process::ExitCode {
    cdc_invalidator::cli::main()
}
