//! Compiles cuda/*.cu ahead of time into one fatbin (sm_90a code plus compute_90 PTX) that the
//! library embeds, so no compiler is needed at run time. Without nvcc the crate still builds and
//! says why at run time; with MOE_EP_REQUIRE_KERNELS=1 (CI) a missing nvcc is an error.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GENCODE: [&str; 4] = [
    "-gencode",
    "arch=compute_90a,code=sm_90a",
    "-gencode",
    "arch=compute_90,code=compute_90",
];

fn nvcc_from_pip() -> Option<PathBuf> {
    let out = Command::new(env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .args(["-c", "import nvidia.cu13 as m; print(list(m.__path__)[0])"])
        .output()
        .ok()?;
    let dir = String::from_utf8(out.stdout).ok()?;
    let nvcc = Path::new(dir.trim()).join("bin").join("nvcc");
    nvcc.is_file().then_some(nvcc)
}

fn find_nvcc() -> Result<PathBuf, String> {
    if let Some(p) = env::var_os("MOE_EP_NVCC") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("MOE_EP_NVCC={} is not a file", p.display()))
        };
    }
    let on_path = env::var_os("PATH")
        .map(|p| {
            env::split_paths(&p)
                .map(|d| d.join("nvcc"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let toolkits = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(env::var_os)
        .map(PathBuf::from)
        .chain([PathBuf::from("/usr/local/cuda")])
        .map(|d| d.join("bin").join("nvcc"));
    on_path
        .into_iter()
        .chain(toolkits)
        .find(|p| p.is_file())
        .or_else(nvcc_from_pip)
        .ok_or_else(|| {
            "no nvcc found (looked at MOE_EP_NVCC, PATH, CUDA_HOME, CUDA_PATH, /usr/local/cuda and \
             the pip wheel nvidia-cuda-nvcc); install it with `pip install nvidia-cuda-nvcc==13.0.88 \
             nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 \
             nvidia-cuda-cccl==13.0.85` and rebuild"
                .to_string()
        })
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let source = manifest.join("cuda").join("moe_ep.cu");
    println!("cargo:rerun-if-changed=cuda");
    for var in [
        "MOE_EP_NVCC",
        "MOE_EP_REQUIRE_KERNELS",
        "MOE_EP_KERNEL_TRACE",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let generated = out_dir.join("fatbin.rs");
    let required = env::var("MOE_EP_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let nvcc = match find_nvcc() {
        Ok(nvcc) => nvcc,
        Err(why) if !required => {
            println!("cargo:warning=moe-ep CUDA kernels not built: {why}");
            std::fs::write(
                &generated,
                format!("pub const FATBIN: Option<&[u8]> = None;\npub const NOT_BUILT: &str = {why:?};\n"),
            )
            .unwrap();
            return;
        }
        Err(why) => panic!("MOE_EP_REQUIRE_KERNELS=1 but {why}"),
    };
    let fatbin = out_dir.join("moe_ep.fatbin");
    // MOE_EP_KERNEL_TRACE=1: kernels that stamp where a call's time goes (moe_ep.cu, EP_TRACE).
    let trace = env::var("MOE_EP_KERNEL_TRACE").is_ok_and(|v| v == "1");
    let status = Command::new(&nvcc)
        .args(GENCODE)
        .args(trace.then_some("-DEP_TRACE"))
        .args([
            "--fatbin",
            "-O3",
            "-std=c++17",
            "-fmad=false",
            "-Xptxas",
            "-warn-spills",
        ])
        .arg("-I")
        .arg(manifest.join("cuda"))
        .arg("-o")
        .arg(&fatbin)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    assert!(
        status.success(),
        "nvcc failed to compile {}",
        source.display()
    );
    std::fs::write(
        &generated,
        format!(
            "pub const FATBIN: Option<&[u8]> = Some(include_bytes!({:?}));\npub const NOT_BUILT: &str = \"\";\n",
            fatbin.display().to_string()
        ),
    )
    .unwrap();
}
