//! Link-time settings for libtorch.
//!
//! torch-sys exports the libtorch lib directory only to crates that depend on it directly
//! (`DEP_TCH_LIBTORCH_LIB`). The binary's RUNPATH is, in order:
//! 1. `$ORIGIN/../lib/evald/torch/lib`: libtorch installed beside the binary by
//!    `scripts/install.sh` (`/usr/local/bin/evald` + `/usr/local/lib/evald/torch/lib`), so
//!    the service reads nothing from the build checkout (which may sit under /home, hidden
//!    by the unit's `ProtectHome=yes`);
//! 2. the checkout's `.libtorch/` folder, so `target/*/evald` starts with no environment
//!    variables.
//!
//! `LD_LIBRARY_PATH` still wins over both (a GPU machine's libtorch). libtorch_cuda is *not*
//! linked: it is dlopen'ed at run time (`infer::device`) so one binary runs on CPU-only
//! machines too.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
            // No shell between rustc and the linker: `$ORIGIN` reaches ld.so literally.
            println!(
                "cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/../lib/evald/torch/lib:{}",
                lib.to_string_lossy()
            );
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
