//! With the `tch` feature: compiles `src/torch_determinism.cpp`, the switch to libtorch's
//! deterministic algorithms, which tch 0.22 does not expose. Nothing otherwise.

fn main() {
    #[cfg(feature = "tch")]
    determinism_shim();
}

#[cfg(feature = "tch")]
fn determinism_shim() {
    println!("cargo:rerun-if-changed=src/torch_determinism.cpp");
    // torch-sys (links = "tch") tells its direct dependents where libtorch's libraries are.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys passes DEP_TCH_LIBTORCH_LIB");
    let root = std::path::Path::new(&lib)
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/torch_determinism.cpp")
        .compile("dtrain_torch_determinism");
}
