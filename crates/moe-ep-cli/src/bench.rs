//! `moe-ep bench`: runs dispatch and combine with one thread per rank, times them, and checks the
//! last iteration of every T against the oracle.

use crate::check::{self, LastOutputs};
use crate::cli::{BackendChoice, BenchArgs, LayoutChoice};
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

    let groups = match backend {
        "cuda" => {
            // Ranks round-robin over the GPUs: more ranks than GPUs share them.
            let devices: Vec<u32> = probe::cuda_devices()?.iter().map(|d| d.ordinal).collect();
            let placed: Vec<u32> = (0..plan.shape.world)
                .map(|r| devices[r % devices.len()])
                .collect();
            share_gpus_safely(plan.shape.world.div_ceil(devices.len()));
            Group::cuda_local(&placed)
        }
        _ => Group::cpu_world(plan.shape.world),
    }
    .map_err(flag_error)?;
    let mut dispatchers = std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .iter()
            .map(|g| {
                let config = plan.config.clone();
                s.spawn(move || Dispatcher::new(g, config))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect::<moe_ep::Result<Vec<_>>>()
    })
    .map_err(flag_error)?;

    let per_t = (plan.warmup + plan.iters) as u64;
    let progress = ProgressBar::new(per_t * plan.tokens.len() as u64);
    progress.set_style(
        ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len} iterations ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );

    let mut rng = StdRng::seed_from_u64(plan.seed);
    let mut results = Vec::with_capacity(plan.tokens.len());
    for &t in &plan.tokens {
        progress.set_message(format!("T={t}"));
        let work = workload::generate(&mut rng, &plan.shape, &plan.placement, t);
        let runs = run_one_t(&mut dispatchers, &work.ranks, &plan, &progress);
        let runs = match runs {
            Ok(r) => r,
            Err(e) => {
                progress.abandon();
                return Err(format!("T={t}: {e}"));
            }
        };
        let mut dispatch_us = Vec::with_capacity(plan.iters);
        let mut combine_us = Vec::with_capacity(plan.iters);
        for i in 0..plan.iters {
            dispatch_us.push(runs.iter().map(|r| r.dispatch_us[i]).fold(0.0, f64::max));
            combine_us.push(runs.iter().map(|r| r.combine_us[i]).fold(0.0, f64::max));
        }
        progress.set_message(format!("T={t} checking"));
        let mut last: Vec<LastOutputs> = runs.into_iter().map(|r| r.last).collect();
        if args.inject_mismatch {
            if let Some(byte) = last
                .last_mut()
                .and_then(|l| l.combine.x.host_bytes_mut().first_mut())
            {
                *byte ^= 1;
            }
        }
        let check = check::verify(&plan.config, plan.shape.world, work.ranks, last);

        let world = plan.shape.world as f64;
        let rows = work.remote_rows as f64 / world;
        let x_row = (plan.shape.hidden * plan.shape.dtype.size()) as f64;
        let scale_row = (plan.shape.scale_columns * 4) as f64;
        let y_row = (plan.shape.hidden * plan.config.combine_dtype().size()) as f64;
        let dispatch = Stats::from_samples(dispatch_us);
        let combine = Stats::from_samples(combine_us);
        let dispatch_bytes = rows * (x_row + scale_row);
        let combine_bytes = rows * y_row;
        results.push(TokensResult {
            tokens: t,
            dispatch_gb_per_s: report::gb_per_s(dispatch_bytes, dispatch.median_us),
            combine_gb_per_s: report::gb_per_s(combine_bytes, combine.median_us),
            dispatch,
            combine,
            remote_rows_per_rank: rows,
            dispatch_bytes_per_rank: dispatch_bytes,
            combine_bytes_per_rank: combine_bytes,
            check_ok: check.is_ok(),
            check: match check {
                Ok(()) => "ok".into(),
                Err(m) => m,
            },
        });
    }
    progress.finish_and_clear();

    let report = Report {
        config: plan.report_config(),
        results,
    };
    println!("{}", report::header(&report.config));
    println!("{}", report::table(&report));
    if let Some(path) = &args.json {
        report::write_json(path, &report)?;
    }
    let failed: Vec<&TokensResult> = report.results.iter().filter(|r| !r.check_ok).collect();
    if failed.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for r in failed {
        eprintln!("error: check failed for T={}: {}", r.tokens, r.check);
    }
    Ok(ExitCode::FAILURE)
}

/// The validated parameters of one run.
struct Plan {
    backend: &'static str,
    config: EpConfig,
    placement: Placement,
    shape: Shape,
    align: Option<usize>,
    tokens: Vec<usize>,
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
        let tokens = args.tokens.0.clone();
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
            warmup: args.warmup as usize,
            iters: args.iters as usize,
            seed: args.seed,
        })
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

/// Every rank's warmup and timed iterations for one T, each rank on its own thread.
fn run_one_t(
    dispatchers: &mut [Dispatcher],
    inputs: &[RankData],
    plan: &Plan,
    progress: &ProgressBar,
) -> moe_ep::Result<Vec<RankRun>> {
    // Ranks start each timed call together, so no rank's time includes a peer's untimed work.
    let start_together = std::sync::Barrier::new(dispatchers.len());
    let start_together = &start_together;
    std::thread::scope(|s| {
        let handles: Vec<_> = dispatchers
            .iter_mut()
            .zip(inputs)
            .enumerate()
            .map(|(rank, (ep, input))| {
                let progress = (rank == 0).then_some(progress);
                s.spawn(move || rank_iterations(ep, input, plan, progress, start_together))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

fn rank_iterations(
    ep: &mut Dispatcher,
    input: &RankData,
    plan: &Plan,
    progress: Option<&ProgressBar>,
    start_together: &std::sync::Barrier,
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
    let (x, idx, weights, scales) = (
        x.view(),
        idx.view(),
        weights.view(),
        scales.as_ref().map(|s| s.view()),
    );
    let mut dispatch_us = Vec::with_capacity(plan.iters);
    let mut combine_us = Vec::with_capacity(plan.iters);
    let mut last = None;
    for it in 0..plan.warmup + plan.iters {
        // Only the last iteration's outputs are kept: free the previous ones first.
        drop(last.take());
        // Each timed call ends when the rank's work is done (a no-op wait on the CPU backend).
        start_together.wait();
        let start = Instant::now();
        let (out, handle) = ep.dispatch(x, idx, Some(weights), scales)?;
        ep.synchronize()?;
        let dispatch_time = start.elapsed();

        // The identity expert: y = the received tokens, in the combine dtype (untimed).
        let widened = widen_for_combine(&out, plan)?;
        let widened_on_device = widened
            .as_ref()
            .map(|bytes| {
                let rows = bytes.len() / (h * plan.config.combine_dtype().size());
                ep.to_device(TensorRef::from_bytes(
                    bytes,
                    &[rows, h],
                    plan.config.combine_dtype(),
                )?)
            })
            .transpose()?;
        let y = match &widened_on_device {
            Some(t) => t.view(),
            None => out.x.view(),
        };
        start_together.wait();
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
        // Kept where they are; read back to the host once, after the timed iterations.
        last = Some(LastOutputs {
            dispatch: out,
            combine: combined,
            y: widened,
        });
    }
    let last = last.expect("at least one iteration");
    let last = LastOutputs {
        dispatch: last.dispatch.to_host()?,
        combine: last.combine.to_host()?,
        y: last.y,
    };
    Ok(RankRun {
        dispatch_us,
        combine_us,
        last,
    })
}

/// When the payload dtype is not the combine dtype (fp8), the valid rows widened exactly to it.
fn widen_for_combine(out: &moe_ep::DispatchOutput, plan: &Plan) -> moe_ep::Result<Option<Vec<u8>>> {
    if plan.shape.dtype == plan.config.combine_dtype() {
        return Ok(None);
    }
    debug_assert_eq!(plan.shape.dtype, DType::Fp8E4M3);
    debug_assert_eq!(plan.config.combine_dtype(), DType::BF16);
    let n = out.valid_rows()? * plan.shape.hidden;
    let x = out.x.to_host()?;
    let mut y = Vec::with_capacity(n * 2);
    for &b in &x.host_bytes()[..n] {
        y.extend_from_slice(&bf16::from_f32(workload::fp8_e4m3_to_f32(b)).to_le_bytes());
    }
    Ok(Some(y))
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
