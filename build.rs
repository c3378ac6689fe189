//! Link-time settings for libtorch.
//!
//! torch-sys exports the libtorch lib directory only to crates that depend on it directly
//! (`DEP_TCH_LIBTORCH_LIB`); we embed it as RUNPATH so `target/*/evald` starts with no
//! environment variables, while `LD_LIBRARY_PATH` can still point at another libtorch
//! (a GPU machine's). libtorch_cuda is *not* linked: it is dlopen'ed at run time
//! (`infer::device`) so one binary runs on CPU-only machines too.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.to_string_lossy());
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
