//! Command-line flags (clap). Flag-level checks live here, so clap reports them naming the flag and
//! exits with status 2; checks that need several flags or the library happen in `bench`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use moe_ep::DType;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "moe-ep",
    version,
    about = "Mixture-of-Experts expert-parallel dispatch/combine: benchmark and backend info"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Time dispatch and combine over a range of token counts and check them against the oracle.
    Bench(BenchArgs),
    /// List the backends this build knows, whether they can run here, and the CUDA devices.
    Info,
}

/// Which backend `bench` runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The best available backend.
    Auto,
    /// Ranks as threads of this process.
    Cpu,
    /// CUDA (NVLink) backend.
    Cuda,
}

/// When a timed call's device work may start (`--start`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StartChoice {
    /// The stream is held until the host has queued the whole call, as in a model whose stream
    /// runs ahead of its host: the time is the device's alone.
    Held,
    /// The stream runs as the host queues the call: where the device outruns the host, the
    /// host's launch time shows in the figure.
    Queued,
}

/// Row order of the dispatch output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LayoutChoice {
    /// One row per (source rank, token).
    TokenMajor,
    /// One row per (source, token, slot), grouped by local expert, groups aligned to `--align`.
    ExpertMajor,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Backend to run on.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,

    /// Number of ranks.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub world: u32,

    /// Hidden size H (elements per token).
    #[arg(long, default_value_t = 7168, value_parser = clap::value_parser!(u32).range(1..))]
    pub hidden: u32,

    /// Number of experts E, placed contiguously (E must be a multiple of --world).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub num_experts: u32,

    /// Experts per token K (distinct, at most --num-experts).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub topk: u32,

    /// Element type of the tokens: bf16, f16, f32 or fp8_e4m3 (fp8 combines in bf16 and carries
    /// ceil(H/128) f32 scales per token).
    #[arg(long, default_value = "bf16", value_parser = parse_dtype)]
    pub dtype: DType,

    /// Comma-separated tokens per rank T to run, e.g. 1,128,512,4096 (0 allowed) [default:
    /// 1,128,512,4096; a routing trace fixes T itself].
    #[arg(long, value_parser = parse_tokens)]
    pub tokens: Option<TokenList>,

    /// How tokens choose experts: `uniform` (K distinct experts, uniformly), `zipf` (skewed:
    /// popularity 1/rank^s over a seeded shuffle of the experts, see --zipf-exponent), or a
    /// safetensors file with one `[T, K]` i32/i64 tensor of expert ids per rank, named rank0,
    /// rank1, ... (a recorded trace; its T replaces --tokens).
    #[arg(long, default_value = "uniform", value_parser = parse_routing)]
    pub routing: RoutingChoice,

    /// The Zipf exponent s of `--routing zipf` (larger is more skewed).
    #[arg(long, default_value_t = 1.2, value_parser = parse_exponent, allow_hyphen_values = true)]
    pub zipf_exponent: f64,

    /// Dispatch output layout.
    #[arg(long, value_enum, default_value_t = LayoutChoice::TokenMajor)]
    pub layout: LayoutChoice,

    /// Row alignment of each expert's group (expert-major only) [default: 128].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub align: Option<u32>,

    /// Untimed iterations per T.
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,

    /// When each of our timed calls starts on the device: `queued` (as the host queues it) or
    /// `held` (once the host queued all of it). The baselines always run as queued: while a
    /// stream is held the host must not wait for the device, and NCCL's code may (the NCCL path
    /// reads its splits to the host in mid-call).
    #[arg(long, value_enum, default_value_t = StartChoice::Queued)]
    pub start: StartChoice,

    /// Timed iterations per T.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub iters: u32,

    /// Seed of the random routing, weights and token values.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Also write every figure (config, samples, medians, bytes, checks) to this JSON file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Also draw median latency against T (log scales) into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// How ranks run: `processes`, one per GPU, started by this command (or joining a
    /// torchrun-style launch when RANK is set); `threads`, in this process. Default: processes
    /// for the cuda backend, threads for the cpu backend (which has only threads).
    #[arg(long, value_enum)]
    pub launch: Option<LaunchChoice>,

    /// What to measure next to the dispatcher, in the same run on the same inputs: a
    /// comma-separated list of `nccl` (Megatron's NCCL all-to-all path: permute, count exchange,
    /// all_to_all_single with host-side splits, weighted un-permute), `allgather` (all-gather every
    /// rank's tokens, select locally; combine by reduce-scatter), `ceiling` (the copy engines moving
    /// the same remote bytes, all ranks to all peers at once), or `all`, or `none`. They need the
    /// cuda backend: elsewhere the bench says why they are skipped and shows `-`. Every NCCL path's
    /// last output is checked like the dispatcher's.
    #[arg(long, default_value = "all", value_parser = parse_baselines)]
    pub baselines: BaselineSet,

    /// SMs (thread blocks) the dispatcher's kernels may use (EpConfig::num_sms) [default: the
    /// backend's own: 24 on cuda, capped at each rank's share of the GPU's SMs].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub num_sms: Option<u32>,

    /// Testing aid: flips one bit of the last rank's last combine output before the check, to
    /// exercise the failure path.
    #[arg(long, hide = true)]
    pub inject_mismatch: bool,
}

/// The `--baselines` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BaselineSet {
    pub nccl: bool,
    pub allgather: bool,
    pub ceiling: bool,
}

impl BaselineSet {
    pub fn any(self) -> bool {
        self.nccl || self.allgather || self.ceiling
    }
}

fn parse_baselines(s: &str) -> Result<BaselineSet, String> {
    let mut set = BaselineSet::default();
    for part in s.split(',').map(str::trim) {
        match part {
            "all" => {
                set = BaselineSet {
                    nccl: true,
                    allgather: true,
                    ceiling: true,
                }
            }
            "none" => {}
            "nccl" => set.nccl = true,
            "allgather" => set.allgather = true,
            "ceiling" => set.ceiling = true,
            other => {
                return Err(format!(
                    "expected a comma-separated list of nccl, allgather, ceiling, or all, or none; got `{other}`"
                ))
            }
        }
    }
    Ok(set)
}

/// The `--routing` choice.
#[derive(Debug, Clone, PartialEq)]
pub enum RoutingChoice {
    Uniform,
    Zipf,
    Trace(PathBuf),
}

fn parse_routing(s: &str) -> Result<RoutingChoice, String> {
    match s {
        "uniform" => Ok(RoutingChoice::Uniform),
        "zipf" => Ok(RoutingChoice::Zipf),
        path if path.ends_with(".safetensors") => Ok(RoutingChoice::Trace(PathBuf::from(path))),
        other => Err(format!(
            "expected uniform, zipf or a FILE.safetensors routing trace, got `{other}`"
        )),
    }
}

fn parse_exponent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(format!("expected a positive number, got `{s}`")),
    }
}

/// The `--tokens` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenList(pub Vec<usize>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LaunchChoice {
    Threads,
    Processes,
}

/// Payload types dispatch accepts.
const DTYPES: &str = "bf16, f16, f32 or fp8_e4m3";

fn parse_dtype(s: &str) -> Result<DType, String> {
    match DType::parse(s) {
        Some(d) if d.is_payload() => Ok(d),
        _ => Err(format!("expected one of {DTYPES}")),
    }
}

fn parse_tokens(s: &str) -> Result<TokenList, String> {
    let mut out = Vec::new();
    for (i, part) in s.split(',').enumerate() {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!(
                "entry {} is empty: expected a comma-separated list of token counts like 1,128,512",
                i + 1
            ));
        }
        let t: u64 = part
            .parse()
            .map_err(|_| format!("`{part}` is not a token count (a non-negative integer)"))?;
        if t > u64::from(u32::MAX) {
            return Err(format!("T = {t} is larger than {} (u32::MAX)", u32::MAX));
        }
        let t = usize::try_from(t).map_err(|_| format!("T = {t} does not fit this machine"))?;
        out.push(t);
    }
    Ok(TokenList(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists() {
        assert_eq!(parse_tokens("0,1, 7").unwrap(), TokenList(vec![0, 1, 7]));
        assert!(parse_tokens("").is_err());
        assert!(parse_tokens("1,,2").is_err());
        assert!(parse_tokens("-1").is_err());
        assert!(parse_tokens("4294967296").is_err());
        assert!(parse_tokens("4294967295").is_ok());
    }

    #[test]
    fn dtypes() {
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("fp8").unwrap(), DType::Fp8E4M3);
        assert!(parse_dtype("i32").is_err());
        assert!(parse_dtype("f64").is_err());
    }

    #[test]
    fn baseline_lists() {
        let all = BaselineSet {
            nccl: true,
            allgather: true,
            ceiling: true,
        };
        assert_eq!(parse_baselines("all").unwrap(), all);
        assert_eq!(parse_baselines("none").unwrap(), BaselineSet::default());
        let some = parse_baselines("nccl, ceiling").unwrap();
        assert!(some.nccl && some.ceiling && !some.allgather);
        assert!(parse_baselines("deepep").unwrap_err().contains("`deepep`"));
        assert!(parse_baselines("").is_err());
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
