//! `moe-ep bench`: runs dispatch and combine on every rank, times them, and checks the last
//! iteration of every T against the oracle. Ranks are threads of this process, or (CUDA) one
//! process per GPU that this command starts, or joins when launched torchrun-style. Each rank runs
//! [`rank_main`]; rank 0 gathers the timings and checks and prints the table.

use crate::check::{self, BaselineOutputs, LastOutputs};
use crate::cli::{
    BackendChoice, BaselineSet, BenchArgs, LaunchChoice, LayoutChoice, RoutingChoice, StartChoice,
};
use crate::report::{
    self, BaselineResult, BaselinesReport, CeilingResult, ConfigReport, HostQueuing, OpResult,
    Report, Stats, TokensResult,
};
use crate::workload::{self, RankData, Shape};
use half::bf16;
use indicatif::{ProgressBar, ProgressStyle};
use moe_ep::baseline::{
    reference, AllGatherDispatch, AllGatherShape, AllToAllDispatch, Ceiling, DeviceTensor,
    NcclBaselines,
};
use moe_ep::probe;
use moe_ep::{
    DType, Dispatcher, EpConfig, EpError, Group, Layout, Placement, PlacementSpec, Tensor,
    TensorRef, Timer,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Default row alignment of the expert-major layout (a grouped GEMM's tile height).
pub const DEFAULT_ALIGN: usize = 128;

/// Backends this binary can run, best first.
const RUNNABLE: &[&str] = &["cuda", "cpu"];

/// Runs the benchmark, prints the table, writes `--json`. `Err` is a usage or library error
/// (printed as `error: ...`, exit 1); a failed check prints the table and exits 1 too.
pub fn run(args: &BenchArgs) -> Result<ExitCode, String> {
    let backend = pick_backend(args.backend)?;
    let plan = Plan::new(args, backend)?;
    if backend == "cuda" && plan.baselines.any() {
        keep_nvlink_multicast_off();
    }
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

/// Prints rank 0's tables (and `--json`, `--plot`); a failed check is exit 1.
fn publish(report: &Report, args: &BenchArgs) -> Result<ExitCode, String> {
    report::print(report);
    if let Some(path) = &args.json {
        report::write_json(path, report)?;
    }
    if let Some(path) = &args.plot {
        crate::plot::latency_svg(path, report)?;
    }
    let mut failed = false;
    for r in &report.results {
        if !r.check_ok {
            eprintln!("error: check failed for T={}: {}", r.tokens, r.check);
            failed = true;
        }
        for b in r.baselines.iter().filter(|b| !b.check_ok) {
            eprintln!(
                "error: baseline {} check failed for T={}: {}",
                b.name, r.tokens, b.check
            );
            failed = true;
        }
    }
    Ok(if !failed {
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

/// One path's timed samples (microseconds) on one rank, one per timed iteration.
#[derive(Serialize, Deserialize, Default)]
struct PathSamples {
    dispatch_us: Vec<f64>,
    combine_us: Vec<f64>,
    end_to_end_us: Vec<f64>,
}

/// How long each of our calls took to return on the host (its queuing), microseconds, one per
/// timed iteration. When it exceeds the device's work, the caller's time is the host's.
#[derive(Serialize, Deserialize, Default)]
struct HostSamples {
    dispatch_us: Vec<f64>,
    cached_us: Vec<f64>,
    combine_us: Vec<f64>,
}

/// What each rank tells rank 0 about one T.
#[derive(Serialize, Deserialize)]
struct RankSummary {
    ours: PathSamples,
    cached_us: Vec<f64>,
    host: HostSamples,
    nccl: Option<PathSamples>,
    allgather: Option<PathSamples>,
    /// The copy-engine rounds of dispatch's bytes, then of combine's.
    ceiling: Option<(Vec<f64>, Vec<f64>)>,
    /// The first mismatch with the oracle, if any.
    mismatch: Option<String>,
    nccl_mismatch: Option<String>,
    allgather_mismatch: Option<String>,
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

    /// `rows[s][d]`: the rows rank s's dispatch sends to rank d (the wire rule; d = s included).
    fn rows_matrix(&self, plan: &Plan) -> Vec<Vec<usize>> {
        self.work
            .ranks
            .iter()
            .map(|r| reference::rows_per_destination(&r.topk_idx, plan.shape.topk, &plan.placement))
            .collect()
    }
}

/// The baselines one rank runs, and why the requested others do not (every rank gets the same
/// errors, so rank 0's list is everyone's).
struct RankBaselines {
    nccl: Option<NcclBaselines>,
    /// The ceiling's reason once it failed to set up (it is not tried again).
    ceiling_skipped: Option<String>,
    skipped: Vec<(String, String)>,
}

impl RankBaselines {
    fn new(ep: &mut Dispatcher, want: BaselineSet) -> RankBaselines {
        let mut skipped = Vec::new();
        let nccl = match want.nccl || want.allgather {
            false => None,
            true => match NcclBaselines::new(ep) {
                Ok(b) => Some(b),
                Err(e) => {
                    for (on, name) in [(want.nccl, "nccl"), (want.allgather, "allgather")] {
                        if on {
                            skipped.push((name.to_string(), skip_reason(&e)));
                        }
                    }
                    None
                }
            },
        };
        RankBaselines {
            nccl,
            ceiling_skipped: None,
            skipped,
        }
    }

    fn skip(&mut self, name: &str, why: String) {
        if !self.skipped.iter().any(|(n, w)| n == name && *w == why) {
            self.skipped.push((name.to_string(), why));
        }
    }

    /// The two copy-engine ceilings of one T (dispatch's bytes, combine's), or `None` after
    /// recording why not.
    fn ceilings(
        &mut self,
        ep: &mut Dispatcher,
        plan: &Plan,
        rows: &[Vec<usize>],
    ) -> Option<(Ceiling, Ceiling)> {
        if !plan.baselines.ceiling || self.ceiling_skipped.is_some() {
            return None;
        }
        let me = ep.rank();
        let (x_row, y_row) = plan.row_bytes();
        let out: Vec<usize> = rows[me].iter().map(|&n| n * x_row).collect();
        let back: Vec<usize> = rows.iter().map(|r| r[me] * y_row).collect();
        let built = Ceiling::new(ep, &out).and_then(|d| Ok((d, Ceiling::new(ep, &back)?)));
        match built {
            Ok(c) => Some(c),
            Err(e) => {
                self.ceiling_skipped = Some(skip_reason(&e));
                self.skip("ceiling", skip_reason(&e));
                None
            }
        }
    }
}

/// A baseline path's check of one rank's last outputs (`check::verify_alltoall`, ...).
type BaselineCheck = fn(
    &EpConfig,
    &Placement,
    &[RankData],
    usize,
    &BaselineOutputs,
    &dyn Fn(&[u8]) -> Vec<u8>,
) -> Result<(), String>;

/// Why a baseline does not run, as the bench prints it: an unavailable backend's reason alone.
fn skip_reason(e: &EpError) -> String {
    match e {
        EpError::BackendUnavailable { reason, .. } => reason.clone(),
        other => other.to_string(),
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
    let mut base = RankBaselines::new(&mut ep, plan.baselines);
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
        let tw = match shared {
            Some(all) => &all[i],
            None => {
                let work =
                    workload::generate(&mut rng, &plan.shape, &plan.placement, t, &plan.routing);
                drawn = TokensWork::new(work, plan);
                &drawn
            }
        };
        let (work, expected) = (&tw.work, &tw.expected);
        let rows = tw.rows_matrix(plan);
        let mut ceilings = base.ceilings(&mut ep, plan, &rows);
        let ag_shape = match (&mut base.nccl, plan.baselines.allgather) {
            (Some(nb), true) => match nb.allgather_shape(&mut ep, work.ranks[rank].num_tokens) {
                Ok(shape) => Some(shape),
                Err(e) => {
                    base.skip("allgather", format!("T={t}: {e}"));
                    None
                }
            },
            _ => None,
        };
        let run = rank_iterations(
            &mut ep,
            &work.ranks[rank],
            plan,
            base.nccl.as_mut(),
            ag_shape,
            ceilings.as_mut(),
            progress.as_ref(),
        )
        .map_err(|e| format!("T={t}: {e}"))?;
        if let Some((d, c)) = ceilings {
            d.close(&mut ep).map_err(|e| format!("T={t}: {e}"))?;
            c.close(&mut ep).map_err(|e| format!("T={t}: {e}"))?;
        }
        let mut last = run.last;
        if args.inject_mismatch && rank + 1 == world {
            if let Some(byte) = last.combine.x.host_bytes_mut().first_mut() {
                *byte ^= 1;
            }
        }
        let to_combine_dtype = |x: &[u8]| payload_in_combine_dtype(x, plan);
        let verify = |f: BaselineCheck, out: &Option<BaselineOutputs>| {
            out.as_ref().and_then(|o| {
                f(
                    &plan.config,
                    &plan.placement,
                    &work.ranks,
                    rank,
                    o,
                    &to_combine_dtype,
                )
                .err()
            })
        };
        let mine = RankSummary {
            ours: run.ours,
            cached_us: run.cached_us,
            host: run.host,
            nccl: run.nccl,
            allgather: run.allgather,
            ceiling: run.ceiling,
            mismatch: check::verify_rank(expected, rank, &last).err(),
            nccl_mismatch: verify(check::verify_alltoall, &run.last_nccl),
            allgather_mismatch: verify(check::verify_allgather, &run.last_allgather),
        };
        let all = ep
            .all_gather_host(serde_json::to_vec(&mine).expect("a summary serializes"))
            .map_err(flag_error)?;
        if rank == 0 {
            let all: Vec<RankSummary> = all
                .iter()
                .map(|b| serde_json::from_slice(b).expect("every rank runs this binary"))
                .collect();
            results.push(tokens_result(plan, t, work, &rows, &all));
        }
    }
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    Ok((rank == 0).then(|| Report {
        config: plan.report_config(),
        baselines: BaselinesReport {
            requested: [
                (plan.baselines.nccl, "nccl"),
                (plan.baselines.allgather, "allgather"),
                (plan.baselines.ceiling, "ceiling"),
            ]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| name.to_string())
            .collect(),
            nccl_version: base.nccl.as_ref().map(|b| b.nccl_version().to_string()),
            skipped: base.skipped.clone(),
        },
        results,
    }))
}

/// One T's figures from every rank's summary: per iteration the slowest rank (the collective
/// ends when it does), then the median over iterations.
fn tokens_result(
    plan: &Plan,
    t: usize,
    work: &workload::Workload,
    rows: &[Vec<usize>],
    all: &[RankSummary],
) -> TokensResult {
    let slowest = |pick: &dyn Fn(&RankSummary) -> Option<&Vec<f64>>| -> Option<Stats> {
        let lists: Vec<&Vec<f64>> = all.iter().map(pick).collect::<Option<_>>()?;
        Some(Stats::from_samples(
            (0..plan.iters)
                .map(|i| lists.iter().map(|l| l[i]).fold(0.0, f64::max))
                .collect(),
        ))
    };
    let world = plan.shape.world;
    let per_rank = |n: usize| n as f64 / world as f64;
    let remote_rows: usize = (0..world)
        .map(|s| {
            (0..world)
                .filter(|&d| d != s)
                .map(|d| rows[s][d])
                .sum::<usize>()
        })
        .sum();
    debug_assert_eq!(remote_rows, work.remote_rows);
    let received_rows: usize = rows.iter().flatten().sum();
    let (x_row, y_row) = plan.row_bytes();
    let (remote, received) = (per_rank(remote_rows), per_rank(received_rows));
    let (dispatch_bytes, combine_bytes) = (remote * x_row as f64, remote * y_row as f64);
    let (dispatch_logical, combine_logical) = (received * x_row as f64, received * y_row as f64);
    let e2e_bytes = dispatch_bytes + combine_bytes;
    let e2e_logical = dispatch_logical + combine_logical;
    let ours = |pick: fn(&RankSummary) -> &Vec<f64>| {
        slowest(&|r| Some(pick(r))).expect("every rank times its own calls")
    };
    let dispatch = ours(|r| &r.ours.dispatch_us);
    let cached = ours(|r| &r.cached_us);
    let combine = ours(|r| &r.ours.combine_us);
    let end_to_end = ours(|r| &r.ours.end_to_end_us);
    let host_queuing = HostQueuing {
        dispatch: ours(|r| &r.host.dispatch_us),
        cached_dispatch: ours(|r| &r.host.cached_us),
        combine: ours(|r| &r.host.combine_us),
    };

    // What the baselines really send to other GPUs, per rank on average (the JSON's wire_*).
    let (k, h) = (plan.shape.topk, plan.shape.hidden);
    let remote_slots: usize = work
        .ranks
        .iter()
        .enumerate()
        .map(|(s, r)| {
            let (_, counts) = reference::alltoall_send_order(&r.topk_idx, k, &plan.placement);
            counts
                .iter()
                .enumerate()
                .filter(|&(d, _)| d != s)
                .map(|(_, n)| n)
                .sum::<usize>()
        })
        .sum();
    let x_only = h * plan.shape.dtype.size();
    let tokens: usize = work.ranks.iter().map(|r| r.num_tokens).sum();
    let gather_rows = per_rank(tokens) * (world - 1) as f64;
    let baseline = |name: &str,
                    pick: fn(&RankSummary) -> Option<&PathSamples>,
                    mismatch: fn(&RankSummary) -> Option<&String>,
                    wire: (f64, f64)| {
        let d = slowest(&|r| pick(r).map(|p| &p.dispatch_us))?;
        let c = slowest(&|r| pick(r).map(|p| &p.combine_us))?;
        let e = slowest(&|r| pick(r).map(|p| &p.end_to_end_us))?;
        let failed = all.iter().find_map(|r| mismatch(r).cloned());
        Some(BaselineResult {
            name: name.into(),
            dispatch_ratio: report::ratio(d.median_us, dispatch.median_us),
            combine_ratio: report::ratio(c.median_us, combine.median_us),
            end_to_end_ratio: report::ratio(e.median_us, end_to_end.median_us),
            dispatch: OpResult::new(d, dispatch_bytes, dispatch_logical),
            combine: OpResult::new(c, combine_bytes, combine_logical),
            end_to_end: OpResult::new(e, e2e_bytes, e2e_logical),
            wire_dispatch_bytes_per_rank: wire.0,
            wire_combine_bytes_per_rank: wire.1,
            check_ok: failed.is_none(),
            check: failed.unwrap_or_else(|| "ok".into()),
        })
    };
    let slots = per_rank(remote_slots);
    let baselines = [
        baseline(
            "nccl",
            |r| r.nccl.as_ref(),
            |r| r.nccl_mismatch.as_ref(),
            (slots * x_only as f64, slots * y_row as f64),
        ),
        baseline(
            "allgather",
            |r| r.allgather.as_ref(),
            |r| r.allgather_mismatch.as_ref(),
            (
                gather_rows * (x_only + 8 * k) as f64,
                gather_rows * y_row as f64,
            ),
        ),
    ]
    .into_iter()
    .flatten()
    .collect();
    let ceiling = slowest(&|r| r.ceiling.as_ref().map(|c| &c.0)).and_then(|cd| {
        let cc = slowest(&|r| r.ceiling.as_ref().map(|c| &c.1))?;
        let pct = |ceil: f64, ours: f64| 100.0 * report::ratio(ceil, ours);
        Some(CeilingResult {
            dispatch_percent: pct(cd.median_us, dispatch.median_us),
            cached_dispatch_percent: pct(cd.median_us, cached.median_us),
            combine_percent: pct(cc.median_us, combine.median_us),
            dispatch: OpResult::new(cd, dispatch_bytes, dispatch_logical),
            combine: OpResult::new(cc, combine_bytes, combine_logical),
        })
    });
    let mismatch = all.iter().find_map(|r| r.mismatch.clone());
    TokensResult {
        tokens: t,
        dispatch_gb_per_s: report::gb_per_s(dispatch_bytes, dispatch.median_us),
        cached_dispatch_gb_per_s: report::gb_per_s(dispatch_bytes, cached.median_us),
        combine_gb_per_s: report::gb_per_s(combine_bytes, combine.median_us),
        end_to_end_gb_per_s: report::gb_per_s(e2e_bytes, end_to_end.median_us),
        dispatch_logical_gb_per_s: report::gb_per_s(dispatch_logical, dispatch.median_us),
        cached_dispatch_logical_gb_per_s: report::gb_per_s(dispatch_logical, cached.median_us),
        combine_logical_gb_per_s: report::gb_per_s(combine_logical, combine.median_us),
        end_to_end_logical_gb_per_s: report::gb_per_s(e2e_logical, end_to_end.median_us),
        dispatch,
        cached_dispatch: cached,
        combine,
        end_to_end,
        host_queuing,
        remote_rows_per_rank: remote,
        received_rows_per_rank: received,
        dispatch_bytes_per_rank: dispatch_bytes,
        combine_bytes_per_rank: combine_bytes,
        dispatch_logical_bytes_per_rank: dispatch_logical,
        combine_logical_bytes_per_rank: combine_logical,
        baselines,
        ceiling,
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
    baselines: BaselineSet,
    num_sms: Option<u32>,
    /// Timed calls start with their stream held until queued (`--start held`).
    held: bool,
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
        let mut builder = EpConfig::builder()
            .num_experts(num_experts)
            .topk(topk)
            .hidden(hidden)
            .max_tokens_per_rank(max_tokens)
            .dtype(args.dtype)
            .layout(layout)
            .scale_columns(scale_columns);
        if let Some(n) = args.num_sms {
            builder = builder.num_sms(n);
        }
        let config = builder.build().map_err(flag_error)?;
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
            baselines: args.baselines,
            num_sms: args.num_sms,
            held: args.start == StartChoice::Held,
        })
    }

    /// Bytes of a row that dispatch moves (x, plus scales) and of one that combine moves.
    fn row_bytes(&self) -> (usize, usize) {
        let x = self.shape.hidden * self.shape.dtype.size() + self.shape.scale_columns * 4;
        (x, self.shape.hidden * self.config.combine_dtype().size())
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
            num_sms: self.num_sms,
            timing: match (self.backend, self.held) {
                ("cuda", true) => "CUDA events; each of our calls held until the host queued all \
                                   of it, the baselines as queued"
                    .into(),
                ("cuda", false) => "CUDA events; each call runs as the host queues it".into(),
                _ => "the host clock".into(),
            },
        }
    }
}

/// One rank's timings (timed iterations only) and its last outputs.
struct RankRun {
    ours: PathSamples,
    cached_us: Vec<f64>,
    host: HostSamples,
    nccl: Option<PathSamples>,
    allgather: Option<PathSamples>,
    ceiling: Option<(Vec<f64>, Vec<f64>)>,
    last: LastOutputs,
    last_nccl: Option<BaselineOutputs>,
    last_allgather: Option<BaselineOutputs>,
}

/// Every rank at once: a host barrier before each timed call, so that no rank's time includes a
/// peer's untimed work; the timer then starts after a device barrier
/// (`Timer::start_together`), so the ranks' timed work starts together on the GPUs rather than
/// whenever each host process got there.
fn barrier(ep: &mut Dispatcher) -> moe_ep::Result<()> {
    ep.all_gather_host(Vec::new()).map(|_| ())
}

/// A timer for this rank's own calls, started together with the other ranks and, with
/// `--start held`, behind a hold of the stream (`Dispatcher::timer_held`).
fn start_ours(ep: &mut Dispatcher, plan: &Plan) -> moe_ep::Result<Timer> {
    match plan.held {
        true => ep.timer_held(),
        false => ep.timer_together(),
    }
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Appends the samples of one iteration when it is a timed one.
fn record(samples: &mut PathSamples, timed: bool, times: [Duration; 3]) {
    if timed {
        samples.dispatch_us.push(micros(times[0]));
        samples.combine_us.push(micros(times[1]));
        samples.end_to_end_us.push(micros(times[2]));
    }
}

/// One rank's warmup and timed iterations for one T: our dispatch, combine, cached dispatch and
/// end-to-end, then each baseline's dispatch, combine and end-to-end, then the copy-engine
/// ceilings. Every call is timed with a `moe_ep::Timer` on the stream it runs on (CUDA events, or
/// the host clock on the CPU backend); the identity expert between dispatch and combine is untimed.
#[allow(clippy::too_many_arguments)]
fn rank_iterations(
    ep: &mut Dispatcher,
    input: &RankData,
    plan: &Plan,
    mut nccl: Option<&mut NcclBaselines>,
    ag_shape: Option<AllGatherShape>,
    mut ceilings: Option<&mut (Ceiling, Ceiling)>,
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
    let run_nccl = plan.baselines.nccl && nccl.is_some();
    let mut ours = PathSamples::default();
    let mut cached_us = Vec::with_capacity(plan.iters);
    let mut host = HostSamples::default();
    let mut nccl_samples = run_nccl.then(PathSamples::default);
    let mut ag_samples = ag_shape.map(|_| PathSamples::default());
    let mut ceiling_samples = ceilings.as_ref().map(|_| (Vec::new(), Vec::new()));
    let last_it = plan.warmup + plan.iters - 1;
    let mut last = None;
    let (mut last_nccl, mut last_ag) = (None, None);
    for it in 0..=last_it {
        let timed = it >= plan.warmup;
        // Each call runs with no other output of this dispatcher alive than the ones it needs
        // (a token-major output may be the receive slot itself while another slot is free), and
        // the last iteration's outputs are read to the host (untimed) before they are dropped.

        barrier(ep)?;
        let timer = start_ours(ep, plan)?;
        let queued = Instant::now();
        let (out, handle) = ep.dispatch(x.view(), idx.view(), Some(weights.view()), scales)?;
        let dispatch_queued = queued.elapsed();
        let dispatch_time = timer.stop(&*ep)?;
        // The timer waited for the work; this reports what the device found.
        ep.synchronize()?;
        let out_host = (it == last_it).then(|| out.to_host()).transpose()?;

        // The identity expert: y = the received tokens, in the combine dtype (untimed).
        let widened = match needs_widening(plan) {
            false => None,
            true => identity_y(ep, &out.x.to_host()?, out.valid_rows()?, plan)?,
        };
        let y = widened.as_ref().map_or_else(|| out.x.view(), |w| w.view());
        barrier(ep)?;
        let timer = start_ours(ep, plan)?;
        let queued = Instant::now();
        let combined = ep.combine(&handle, y, None)?;
        let combine_queued = queued.elapsed();
        let combine_time = timer.stop(&*ep)?;
        ep.synchronize()?;
        let combined_host = (it == last_it).then(|| combined.to_host()).transpose()?;
        drop((combined, out));

        barrier(ep)?;
        let timer = start_ours(ep, plan)?;
        let queued = Instant::now();
        let cached = ep.dispatch_cached(&handle, x.view(), scales)?;
        let cached_queued = queued.elapsed();
        let cached_time = timer.stop(&*ep)?;
        ep.synchronize()?;
        let cached_host = (it == last_it).then(|| cached.x.to_host()).transpose()?;
        drop((cached, handle));

        // End to end: dispatch, then combine of its rows (fp8: the widened rows of the same
        // routing, made above), one timer around both.
        barrier(ep)?;
        let timer = start_ours(ep, plan)?;
        let (out2, handle2) = ep.dispatch(x.view(), idx.view(), Some(weights.view()), scales)?;
        let y2 = widened.as_ref().map_or_else(|| out2.x.view(), |w| w.view());
        let combined2 = ep.combine(&handle2, y2, None)?;
        let e2e_time = timer.stop(&*ep)?;
        ep.synchronize()?;
        drop((combined2, out2, handle2, widened));
        record(&mut ours, timed, [dispatch_time, combine_time, e2e_time]);
        if timed {
            cached_us.push(micros(cached_time));
            host.dispatch_us.push(micros(dispatch_queued));
            host.cached_us.push(micros(cached_queued));
            host.combine_us.push(micros(combine_queued));
        }
        if let (Some(dispatch), Some(combine), Some(cached)) =
            (out_host, combined_host, cached_host)
        {
            last = Some(LastOutputs {
                dispatch,
                combine,
                cached,
            });
        }

        let keep = it == last_it;
        if let (Some(nb), Some(samples)) = (nccl.as_deref_mut(), nccl_samples.as_mut()) {
            let (times, kept) = baseline_iteration(
                ep,
                nb,
                plan,
                keep,
                |nb| nb.alltoall_dispatch(x.view(), idx.view()),
                |nb, d, y| nb.alltoall_combine(d, y, weights.view()),
            )?;
            if kept.is_some() {
                last_nccl = kept;
            }
            record(samples, timed, times);
        }

        if let (Some(nb), Some(shape), Some(samples)) =
            (nccl.as_deref_mut(), ag_shape.as_ref(), ag_samples.as_mut())
        {
            let (times, kept) = baseline_iteration(
                ep,
                nb,
                plan,
                keep,
                |nb| nb.allgather_dispatch(shape, x.view(), idx.view(), weights.view()),
                |nb, d, y| nb.allgather_combine(d, y),
            )?;
            if kept.is_some() {
                last_ag = kept;
            }
            record(samples, timed, times);
        }

        if let (Some(pair), Some(samples)) = (ceilings.as_deref_mut(), ceiling_samples.as_mut()) {
            let round = |ep: &mut Dispatcher, c: &mut Ceiling| -> moe_ep::Result<Duration> {
                barrier(ep)?;
                let timer = Timer::start_together(&*c, ep)?;
                c.run()?;
                timer.stop(&*c)
            };
            let out_time = round(ep, &mut pair.0)?;
            let back_time = round(ep, &mut pair.1)?;
            if timed {
                samples.0.push(micros(out_time));
                samples.1.push(micros(back_time));
            }
        }

        if let Some(p) = progress {
            p.inc(1);
        }
    }
    Ok(RankRun {
        ours,
        cached_us,
        host,
        nccl: nccl_samples,
        allgather: ag_samples,
        ceiling: ceiling_samples,
        last: last.expect("the last iteration keeps its outputs"),
        last_nccl,
        last_allgather: last_ag,
    })
}

/// The received rows of a baseline's dispatch: what the identity expert hands back to its combine.
trait BaselineRows {
    fn rows(&self) -> &DeviceTensor;
}

impl BaselineRows for AllToAllDispatch {
    fn rows(&self) -> &DeviceTensor {
        &self.x
    }
}

impl BaselineRows for AllGatherDispatch {
    fn rows(&self) -> &DeviceTensor {
        &self.x
    }
}

/// One iteration of a baseline path, each call timed as ours are by default (a host barrier, then
/// a timer started after a device barrier; never held: see `--start`): dispatch; combine of the
/// identity expert's rows; both again end to end. Returns the three times and, when `keep`, the
/// outputs read to the host for the check.
fn baseline_iteration<D: BaselineRows>(
    ep: &mut Dispatcher,
    nb: &mut NcclBaselines,
    plan: &Plan,
    keep: bool,
    dispatch: impl Fn(&mut NcclBaselines) -> moe_ep::Result<D>,
    combine: impl Fn(&mut NcclBaselines, &D, TensorRef<'_>) -> moe_ep::Result<DeviceTensor>,
) -> moe_ep::Result<([Duration; 3], Option<BaselineOutputs>)> {
    barrier(ep)?;
    let timer = Timer::start_together(&*nb, ep)?;
    let d = dispatch(nb)?;
    let dispatch_time = timer.stop(&*nb)?;
    let wy = match needs_widening(plan) {
        false => None,
        true => identity_y(ep, &d.rows().to_host()?, d.rows().dims()[0], plan)?,
    };
    let y = wy.as_ref().map_or_else(|| d.rows().view(), |w| w.view());
    barrier(ep)?;
    let timer = Timer::start_together(&*nb, ep)?;
    let c = combine(nb, &d, y)?;
    let combine_time = timer.stop(&*nb)?;
    let kept = match keep {
        true => Some(BaselineOutputs {
            dispatch: d.rows().to_host()?,
            combine: c.to_host()?,
        }),
        false => None,
    };
    drop((c, d));
    barrier(ep)?;
    let timer = Timer::start_together(&*nb, ep)?;
    let d2 = dispatch(nb)?;
    let y2 = wy.as_ref().map_or_else(|| d2.rows().view(), |w| w.view());
    let c2 = combine(nb, &d2, y2)?;
    let e2e_time = timer.stop(&*nb)?;
    drop((c2, d2, wy));
    Ok(([dispatch_time, combine_time, e2e_time], kept))
}

/// Whether the identity expert must widen the received rows (fp8 payloads combine in bf16).
fn needs_widening(plan: &Plan) -> bool {
    plan.shape.dtype != plan.config.combine_dtype()
}

/// The identity expert's output for the first `rows` rows of `received` (a host copy): the rows
/// widened exactly to the combine dtype, on the dispatcher's device.
fn identity_y(
    ep: &Dispatcher,
    received: &Tensor,
    rows: usize,
    plan: &Plan,
) -> moe_ep::Result<Option<Tensor>> {
    let h = plan.shape.hidden;
    let bytes = payload_in_combine_dtype(
        &received.host_bytes()[..rows * h * plan.shape.dtype.size()],
        plan,
    );
    let y = TensorRef::from_bytes(&bytes, &[rows, h], plan.config.combine_dtype())?;
    Ok(Some(ep.to_device(y)?))
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
            "num_sms" => Some("--num-sms"),
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

/// NCCL's NVLink multicast (NVLS) stays off, as on the machines this runs on (see shared/GPU.md):
/// set NCCL_NVLS_ENABLE=0 unless the user chose. Runs on the main thread before any rank starts
/// (rank processes inherit it).
fn keep_nvlink_multicast_off() {
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        std::env::set_var("NCCL_NVLS_ENABLE", "0");
    }
}
