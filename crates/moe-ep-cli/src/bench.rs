//! `moe-ep bench`: runs dispatch and combine on every rank, times them, and checks the last
//! iteration of every T against the oracle. Ranks are threads of this process, or (CUDA) one
//! process per GPU that this command starts, or joins when launched torchrun-style. Each rank runs
//! [`rank_main`]; rank 0 gathers the timings and checks and prints the table.

use crate::check::{self, LastOutputs};
use crate::cli::{BackendChoice, BenchArgs, LaunchChoice, LayoutChoice, RoutingChoice};
use crate::report::{self, ConfigReport, Report, Stats, TokensResult};
use crate::workload::{self, RankData, Shape};
use half::bf16;
use indicatif::{ProgressBar, ProgressStyle};
use moe_ep::probe;
use moe_ep::{
    DType, Dispatcher, EpConfig, EpError, Group, Layout, Placement, PlacementSpec, TensorRef,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::time::Instant;

/// Default row alignment of the expert-major layout (a grouped GEMM's tile height).
pub const DEFAULT_ALIGN: usize = 128;

/// Backends this binary can run, best first.
const RUNNABLE: &[&str] = &["cuda", "cpu"];

/// Runs the benchmark, prints the table, writes `--json`. `Err` is a usage or library error
/// (printed as `error: ...`, exit 1); a failed check prints the table and exits 1 too.
pub fn run(args: &BenchArgs) -> Result<ExitCode, String> {
    let backend = pick_backend(args.backend)?;
    let plan = Plan::new(args, backend)?;
    let launch = args.launch.unwrap_or(match backend {
        "cuda" => LaunchChoice::Processes,
        _ => LaunchChoice::Threads,
    });
    let reports: Vec<Option<Report>> = match (backend, launch) {
        ("cuda", LaunchChoice::Processes) if std::env::var_os("RANK").is_some() => {
            let group = Group::from_env().map_err(flag_error)?;
            if group.world() != plan.shape.world {
                return Err(format!(
                    "--world: expected WORLD_SIZE = {}, got {}",
                    group.world(),
                    plan.shape.world
                ));
            }
            vec![rank_main(&group, &plan, args, None)?]
        }
        ("cuda", LaunchChoice::Processes) => return launch_processes(plan.shape.world),
        (_, LaunchChoice::Processes) => {
            return Err(format!(
                "--launch processes: the {backend} backend runs ranks as threads of one process"
            ))
        }
        (_, LaunchChoice::Threads) => {
            let groups = local_groups(backend, plan.shape.world)?;
            // One copy of the inputs and of the oracle's answers for all rank threads.
            let workloads = plan.workloads();
            let workloads = &workloads;
            std::thread::scope(|s| {
                let ranks: Vec<_> = groups
                    .iter()
                    .map(|g| s.spawn(|| rank_main(g, &plan, args, Some(workloads))))
                    .collect();
                ranks
                    .into_iter()
                    .map(|h| h.join().expect("rank thread panicked"))
                    .collect::<Result<Vec<_>, String>>()
            })?
        }
    };
    match reports.into_iter().flatten().next() {
        Some(report) => publish(&report, args),
        None => Ok(ExitCode::SUCCESS), // another rank than 0: rank 0 reports
    }
}

/// Prints rank 0's table (and `--json`); a failed check is exit 1.
fn publish(report: &Report, args: &BenchArgs) -> Result<ExitCode, String> {
    println!("{}", report::header(&report.config));
    println!("{}", report::table(report));
    if let Some(path) = &args.json {
        report::write_json(path, report)?;
    }
    if let Some(path) = &args.plot {
        crate::plot::latency_svg(path, report)?;
    }
    let failed: Vec<&TokensResult> = report.results.iter().filter(|r| !r.check_ok).collect();
    for r in &failed {
        eprintln!("error: check failed for T={}: {}", r.tokens, r.check);
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The ranks of a group of this process: CPU threads, or CUDA ranks round-robin over the GPUs.
fn local_groups(backend: &str, world: usize) -> Result<Vec<Group>, String> {
    match backend {
        "cuda" => {
            // More ranks than GPUs share them.
            let devices: Vec<u32> = probe::cuda_devices()?.iter().map(|d| d.ordinal).collect();
            let placed: Vec<u32> = (0..world).map(|r| devices[r % devices.len()]).collect();
            share_gpus_safely(world.div_ceil(devices.len()));
            Group::cuda_local(&placed)
        }
        _ => Group::cpu_world(world),
    }
    .map_err(flag_error)
}

/// Starts one process per rank (this binary with the same arguments), torchrun-style, and waits:
/// rank 0 prints the table; the exit code is a failure when any rank failed.
fn launch_processes(world: usize) -> Result<ExitCode, String> {
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port for the rank processes: {e}"))?
        .port();
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let children = (0..world)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(&args)
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .spawn()
                .map_err(|e| format!("starting rank process {r}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut ok = true;
    for (r, mut child) in children.into_iter().enumerate() {
        let status = child
            .wait()
            .map_err(|e| format!("waiting for rank process {r}: {e}"))?;
        if !status.success() {
            eprintln!("error: rank process {r} {status}");
            ok = false;
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What each rank tells rank 0 about one T.
#[derive(Serialize, Deserialize)]
struct RankSummary {
    dispatch_us: Vec<f64>,
    combine_us: Vec<f64>,
    /// The first mismatch with the oracle, if any.
    mismatch: Option<String>,
}

/// One T's inputs for every rank and what the oracle says each must get.
struct TokensWork {
    work: workload::Workload,
    expected: check::Expected,
}

impl TokensWork {
    fn new(work: workload::Workload, plan: &Plan) -> TokensWork {
        let to_combine_dtype = |x: &[u8]| payload_in_combine_dtype(x, plan);
        let expected = check::Expected::compute(&plan.config, &work.ranks, &to_combine_dtype);
        TokensWork { work, expected }
    }
}

/// One rank's whole benchmark; rank 0 returns the report. `shared`: every T's inputs and oracle
/// answers, when the ranks are threads of one process; a rank process makes its own (the same,
/// from the seed).
fn rank_main(
    group: &Group,
    plan: &Plan,
    args: &BenchArgs,
    shared: Option<&[TokensWork]>,
) -> Result<Option<Report>, String> {
    let (rank, world) = (group.rank(), plan.shape.world);
    let mut ep = Dispatcher::new(group, plan.config.clone()).map_err(flag_error)?;
    let progress = (rank == 0).then(|| {
        let per_t = (plan.warmup + plan.iters) as u64;
        let bar = ProgressBar::new(per_t * plan.tokens.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} iterations ({elapsed})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar
    });
    // Every rank has every rank's inputs (drawn from the same seed), so each can check itself.
    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut results = Vec::with_capacity(plan.tokens.len());
    for (i, &t) in plan.tokens.iter().enumerate() {
        if let Some(p) = &progress {
            p.set_message(format!("T={t}"));
        }
        let drawn;
        let TokensWork { work, expected } = match shared {
            Some(all) => &all[i],
            None => {
                let work =
                    workload::generate(&mut rng, &plan.shape, &plan.placement, t, &plan.routing);
                drawn = TokensWork::new(work, plan);
                &drawn
            }
        };
        let run = rank_iterations(&mut ep, &work.ranks[rank], plan, progress.as_ref())
            .map_err(|e| format!("T={t}: {e}"))?;
        let mut last = run.last;
        if args.inject_mismatch && rank + 1 == world {
            if let Some(byte) = last.combine.x.host_bytes_mut().first_mut() {
                *byte ^= 1;
            }
        }
        let mismatch = check::verify_rank(expected, rank, &last).err();
        let mine = RankSummary {
            dispatch_us: run.dispatch_us,
            combine_us: run.combine_us,
            mismatch,
        };
        let all = ep
            .all_gather_host(serde_json::to_vec(&mine).expect("a summary serializes"))
            .map_err(flag_error)?;
        if rank == 0 {
            let all: Vec<RankSummary> = all
                .iter()
                .map(|b| serde_json::from_slice(b).expect("every rank runs this binary"))
                .collect();
            results.push(tokens_result(plan, t, work.remote_rows, &all));
        }
    }
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    Ok((rank == 0).then(|| Report {
        config: plan.report_config(),
        results,
    }))
}

/// One T's row of the report from every rank's summary: per iteration the slowest rank (the
/// collective ends when it does), then the median over iterations.
fn tokens_result(plan: &Plan, t: usize, remote_rows: usize, all: &[RankSummary]) -> TokensResult {
    let slowest = |pick: fn(&RankSummary) -> &Vec<f64>| -> Vec<f64> {
        (0..plan.iters)
            .map(|i| all.iter().map(|r| pick(r)[i]).fold(0.0, f64::max))
            .collect()
    };
    let dispatch = Stats::from_samples(slowest(|r| &r.dispatch_us));
    let combine = Stats::from_samples(slowest(|r| &r.combine_us));
    let rows = remote_rows as f64 / plan.shape.world as f64;
    let x_row = (plan.shape.hidden * plan.shape.dtype.size()) as f64;
    let scale_row = (plan.shape.scale_columns * 4) as f64;
    let y_row = (plan.shape.hidden * plan.config.combine_dtype().size()) as f64;
    let dispatch_bytes = rows * (x_row + scale_row);
    let combine_bytes = rows * y_row;
    let mismatch = all.iter().find_map(|r| r.mismatch.clone());
    TokensResult {
        tokens: t,
        dispatch_gb_per_s: report::gb_per_s(dispatch_bytes, dispatch.median_us),
        combine_gb_per_s: report::gb_per_s(combine_bytes, combine.median_us),
        dispatch,
        combine,
        remote_rows_per_rank: rows,
        dispatch_bytes_per_rank: dispatch_bytes,
        combine_bytes_per_rank: combine_bytes,
        check_ok: mismatch.is_none(),
        check: mismatch.unwrap_or_else(|| "ok".into()),
    }
}

/// The validated parameters of one run.
struct Plan {
    backend: &'static str,
    config: EpConfig,
    placement: Placement,
    shape: Shape,
    align: Option<usize>,
    tokens: Vec<usize>,
    routing: workload::Routing,
    warmup: usize,
    iters: usize,
    seed: u64,
}

impl Plan {
    fn new(args: &BenchArgs, backend: &'static str) -> Result<Plan, String> {
        let world = args.world as usize;
        let hidden = args.hidden as usize;
        let num_experts = args.num_experts as usize;
        let topk = args.topk as usize;
        if topk > num_experts {
            return Err(format!(
                "--topk: expected at most --num-experts = {num_experts} (each token picks distinct experts), got {topk}"
            ));
        }
        let (layout, align) = match args.layout {
            LayoutChoice::TokenMajor => {
                if args.align.is_some() {
                    return Err(
                        "--align: only applies to --layout expert-major (token-major rows are not grouped)"
                            .into(),
                    );
                }
                (Layout::TokenMajor, None)
            }
            LayoutChoice::ExpertMajor => {
                let align = args.align.map_or(DEFAULT_ALIGN, |a| a as usize);
                (Layout::ExpertMajor { align }, Some(align))
            }
        };
        let shape_for_trace = Shape {
            world,
            hidden,
            num_experts,
            topk,
            dtype: args.dtype,
            scale_columns: 0,
        };
        let (routing, tokens) = match (&args.routing, &args.tokens) {
            (RoutingChoice::Trace(_), Some(_)) => {
                return Err(
                    "--tokens: a routing trace fixes each rank's T; leave --tokens out".into(),
                )
            }
            (RoutingChoice::Trace(path), None) => {
                let trace = workload::load_trace(path, &shape_for_trace)?;
                let t = trace.iter().map(|r| r.len() / topk).max().unwrap_or(0);
                (workload::Routing::Trace(trace), vec![t])
            }
            (choice, tokens) => (
                match choice {
                    RoutingChoice::Zipf => workload::Routing::Zipf {
                        exponent: args.zipf_exponent,
                    },
                    _ => workload::Routing::Uniform,
                },
                tokens
                    .as_ref()
                    .map_or(vec![1, 128, 512, 4096], |t| t.0.clone()),
            ),
        };
        let max_tokens = tokens.iter().copied().max().unwrap_or(0).max(1);
        // fp8 payloads carry per-token block scales, one f32 per 128 columns (as DeepEP does).
        let scale_columns = match args.dtype {
            DType::Fp8E4M3 => hidden.div_ceil(128),
            _ => 0,
        };
        let config = EpConfig::builder()
            .num_experts(num_experts)
            .topk(topk)
            .hidden(hidden)
            .max_tokens_per_rank(max_tokens)
            .dtype(args.dtype)
            .layout(layout)
            .scale_columns(scale_columns)
            .build()
            .map_err(flag_error)?;
        let placement =
            Placement::new(&PlacementSpec::Contiguous, num_experts, world).map_err(flag_error)?;
        Ok(Plan {
            backend,
            shape: Shape {
                world,
                hidden,
                num_experts,
                topk,
                dtype: args.dtype,
                scale_columns,
            },
            config,
            placement,
            align,
            tokens,
            routing,
            warmup: args.warmup as usize,
            iters: args.iters as usize,
            seed: args.seed,
        })
    }

    /// Every T's inputs, drawn in order from the seed (what each rank process draws for itself),
    /// with the oracle's answers.
    fn workloads(&self) -> Vec<TokensWork> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        self.tokens
            .iter()
            .map(|&t| {
                TokensWork::new(
                    workload::generate(&mut rng, &self.shape, &self.placement, t, &self.routing),
                    self,
                )
            })
            .collect()
    }

    fn report_config(&self) -> ConfigReport {
        ConfigReport {
            backend: self.backend.into(),
            world: self.shape.world,
            hidden: self.shape.hidden,
            num_experts: self.shape.num_experts,
            topk: self.shape.topk,
            dtype: self.shape.dtype.to_string(),
            combine_dtype: self.config.combine_dtype().to_string(),
            layout: self.config.layout().name().into(),
            align: self.align,
            scale_columns: self.shape.scale_columns,
            placement: "contiguous".into(),
            max_tokens_per_rank: self.config.max_tokens_per_rank(),
            tokens: self.tokens.clone(),
            routing: match &self.routing {
                workload::Routing::Uniform => "uniform".into(),
                workload::Routing::Zipf { exponent } => format!("zipf (exponent {exponent})"),
                workload::Routing::Trace(_) => "trace".into(),
            },
            warmup: self.warmup,
            iters: self.iters,
            seed: self.seed,
        }
    }
}

/// One rank's timings (timed iterations only) and its last outputs.
struct RankRun {
    dispatch_us: Vec<f64>,
    combine_us: Vec<f64>,
    last: LastOutputs,
}

/// One rank's warmup and timed iterations for one T. The ranks start each timed call together
/// (a host barrier), so no rank's time includes a peer's untimed work.
fn rank_iterations(
    ep: &mut Dispatcher,
    input: &RankData,
    plan: &Plan,
    progress: Option<&ProgressBar>,
) -> moe_ep::Result<RankRun> {
    let (t, h, k) = (input.num_tokens, plan.shape.hidden, plan.shape.topk);
    // Inputs go where the backend reads them (device memory for CUDA) once, outside the timing.
    let x = ep.to_device(TensorRef::from_bytes(&input.x, &[t, h], plan.shape.dtype)?)?;
    let idx = ep.to_device(TensorRef::new(&input.topk_idx, &[t, k])?)?;
    let weights = ep.to_device(TensorRef::new(&input.weights, &[t, k])?)?;
    let scales = match &input.scales {
        Some(s) => Some(ep.to_device(TensorRef::new(s, &[t, plan.shape.scale_columns])?)?),
        None => None,
    };
    let scales = scales.as_ref().map(|s| s.view());
    let mut dispatch_us = Vec::with_capacity(plan.iters);
    let mut combine_us = Vec::with_capacity(plan.iters);
    let mut last = None;
    for it in 0..plan.warmup + plan.iters {
        // Only the last iteration's outputs are kept: free the previous ones first.
        drop(last.take());
        // Each timed call ends when the rank's work is done (a no-op wait on the CPU backend).
        ep.all_gather_host(Vec::new())?;
        let start = Instant::now();
        let (out, handle) = ep.dispatch(x.view(), idx.view(), Some(weights.view()), scales)?;
        ep.synchronize()?;
        let dispatch_time = start.elapsed();

        // The identity expert: y = the received tokens, in the combine dtype (untimed).
        let widened = match plan.shape.dtype == plan.config.combine_dtype() {
            true => None,
            false => {
                let rows = out.valid_rows()?;
                let host = out.x.to_host()?;
                let bytes = payload_in_combine_dtype(&host.host_bytes()[..rows * h], plan);
                Some(ep.to_device(TensorRef::from_bytes(
                    &bytes,
                    &[rows, h],
                    plan.config.combine_dtype(),
                )?)?)
            }
        };
        let y = widened.as_ref().map_or_else(|| out.x.view(), |w| w.view());
        ep.all_gather_host(Vec::new())?;
        let start = Instant::now();
        let combined = ep.combine(&handle, y, None)?;
        ep.synchronize()?;
        let combine_time = start.elapsed();

        if it >= plan.warmup {
            dispatch_us.push(dispatch_time.as_secs_f64() * 1e6);
            combine_us.push(combine_time.as_secs_f64() * 1e6);
        }
        if let Some(p) = progress {
            p.inc(1);
        }
        last = Some((out, combined));
    }
    // Read back to the host once, after the timed iterations.
    let (out, combined) = last.expect("at least one iteration");
    Ok(RankRun {
        dispatch_us,
        combine_us,
        last: LastOutputs {
            dispatch: out.to_host()?,
            combine: combined.to_host()?,
        },
    })
}

/// Payload rows turned into the combine dtype: as they are, or fp8 widened exactly to bf16.
fn payload_in_combine_dtype(x: &[u8], plan: &Plan) -> Vec<u8> {
    if plan.shape.dtype == plan.config.combine_dtype() {
        return x.to_vec();
    }
    debug_assert_eq!(plan.shape.dtype, DType::Fp8E4M3);
    debug_assert_eq!(plan.config.combine_dtype(), DType::BF16);
    x.iter()
        .flat_map(|&b| bf16::from_f32(workload::fp8_e4m3_to_f32(b)).to_le_bytes())
        .collect()
}

/// The backend to run: the best available one this binary can drive, or the requested one with
/// the probe's reason when it cannot run here.
fn pick_backend(choice: BackendChoice) -> Result<&'static str, String> {
    let all = probe::backends();
    let wanted = match choice {
        BackendChoice::Auto => {
            return all
                .iter()
                .find(|b| b.available && RUNNABLE.contains(&b.name))
                .map(|b| b.name)
                .ok_or_else(|| "--backend auto: no available backend".to_string());
        }
        BackendChoice::Cpu => "cpu",
        BackendChoice::Cuda => "cuda",
    };
    let status = all
        .iter()
        .find(|b| b.name == wanted)
        .ok_or_else(|| format!("--backend {wanted}: this build does not know that backend"))?;
    if !status.available {
        return Err(format!(
            "--backend {wanted}: the {wanted} backend is unavailable: {}",
            status.detail
        ));
    }
    if !RUNNABLE.contains(&wanted) {
        return Err(format!(
            "--backend {wanted}: this build of moe-ep cannot run the {wanted} backend yet"
        ));
    }
    Ok(status.name)
}

/// A library error, prefixed with the flag that set the offending value.
pub fn flag_error(e: EpError) -> String {
    let flag = match &e {
        EpError::InvalidConfig { field, .. } => match *field {
            "num_experts" => Some("--num-experts"),
            "topk" => Some("--topk"),
            "hidden" => Some("--hidden"),
            "max_tokens_per_rank" => Some("--tokens"),
            "dtype" | "combine_dtype" => Some("--dtype"),
            "layout.align" => Some("--align"),
            _ => None,
        },
        EpError::Group { arg: "world", .. } => Some("--world"),
        _ => None,
    };
    match flag {
        Some(f) => format!("{f}: {e}"),
        None => e.to_string(),
    }
}

/// Ranks sharing a GPU need a hardware queue each (see `Group::cuda_local`); give them enough
/// when the user did not choose. Runs on the main thread before any CUDA context exists.
fn share_gpus_safely(ranks_per_gpu: usize) {
    if ranks_per_gpu > 1 && std::env::var_os("CUDA_DEVICE_MAX_CONNECTIONS").is_none() {
        std::env::set_var(
            "CUDA_DEVICE_MAX_CONNECTIONS",
            (4 * ranks_per_gpu).max(8).to_string(),
        );
    }
}
