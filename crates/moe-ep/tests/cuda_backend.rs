//! CUDA-only checks beyond the conformance suite: bit-identical results to the CPU backend on
//! fresh random inputs, and a missing rank turning into a timeout error rather than a hang.
//! Without a usable GPU each test says why it is skipped.

use cudarc::driver::{CudaContext, CudaStream};
use half::bf16;
use moe_ep::{Device, Dispatcher, EpConfig, EpError, Group, Layout, OutputSizing, TensorRef};
use moe_ep_conformance::suite::{print_skip, run_ranks, BackendUnderTest, CpuBackend};
use moe_ep_conformance::CudaLocal;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::sync::Arc;
use std::sync::Barrier;
use std::time::{Duration, Instant};

fn cuda_or_skip(test: &str) -> Option<CudaLocal> {
    match CudaLocal::from_env() {
        Ok(c) => Some(c),
        Err(reason) => {
            print_skip(test, &reason);
            None
        }
    }
}

/// The world of the CUDA-vs-CPU checks: one rank per GPU on a machine of 8 GPUs (the usual EP8
/// node), else 4 ranks placed round-robin on the GPUs there are.
fn cpu_comparison_world(cuda: &CudaLocal) -> usize {
    cuda.distinct_devices().clamp(4, 8)
}

struct RankData {
    x: Vec<bf16>,
    topk: Vec<i32>,
    weights: Vec<f32>,
}

fn random_inputs(seed: u64, world: usize, t: usize, h: usize, e: usize, k: usize) -> Vec<RankData> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..world)
        .map(|_| RankData {
            x: (0..t * h)
                .map(|_| bf16::from_f32(rng.random_range(-4.0..4.0)))
                .collect(),
            topk: (0..t * k)
                .map(|_| {
                    if rng.random_range(0..10) == 0 {
                        -1
                    } else {
                        rng.random_range(0..e as i32)
                    }
                })
                .collect(),
            weights: (0..t * k).map(|_| rng.random_range(0.0..1.0)).collect(),
        })
        .collect()
}

/// Every output of dispatch, combine and both backwards on one rank, as host bytes. With
/// `callers_stream`, the calls run on a stream this function makes, as a framework's would.
fn run_rank_on(
    group: &Group,
    config: &EpConfig,
    data: &[RankData],
    callers_stream: bool,
) -> Result<Vec<Vec<u8>>, String> {
    let (t, h, k) = (
        data[0].x.len() / config.hidden(),
        config.hidden(),
        config.topk(),
    );
    let d = &data[group.rank()];
    let err = |e: EpError| e.to_string();
    // Declared before the dispatcher so that it is dropped after it (its memory is freed on it),
    // and made before it: with ranks sharing a GPU, a stream made while another rank's kernel
    // waits in the GPU may be queued behind that kernel (see Dispatcher::set_cuda_stream).
    let stream: Option<Arc<CudaStream>> = match (callers_stream, group.device()) {
        (false, _) => None,
        (true, Device::Cuda(ordinal)) => {
            let ctx = CudaContext::new(ordinal as usize).map_err(|e| format!("{e:?}"))?;
            // cudarc synchronizes a tracking context before its first new stream: with another
            // rank of this GPU already in a kernel that waits for this one, that would wait out
            // the timeout.
            // SAFETY: this test allocates no CudaSlice, the only thing event tracking protects.
            unsafe { ctx.disable_event_tracking() };
            Some(ctx.new_stream().map_err(|e| format!("{e:?}"))?)
        }
        (true, Device::Host) => return Err("a caller's stream needs a GPU rank".into()),
    };
    let mut ep = Dispatcher::new(group, config.clone()).map_err(err)?;
    if group.device() != ep.device() {
        return Err(format!(
            "group.device(): expected the dispatcher's {}, got {}",
            ep.device(),
            group.device()
        ));
    }
    if let Some(stream) = &stream {
        let raw = stream.cu_stream() as u64;
        // SAFETY: a stream of this GPU's primary context, alive until after the dispatcher and
        // every tensor it returns (they are all dropped inside this function, before `stream`).
        unsafe { ep.set_cuda_stream(raw) }.map_err(err)?;
        if ep.cuda_stream() != Some(raw) {
            return Err(format!(
                "cuda_stream(): expected the caller's {raw:#x}, got {:?}",
                ep.cuda_stream()
            ));
        }
    }
    let put = |v: TensorRef<'_>| ep.to_device(v).map_err(err);
    let x = put(TensorRef::new(&d.x, &[t, h]).map_err(err)?)?;
    let topk = put(TensorRef::new(&d.topk, &[t, k]).map_err(err)?)?;
    let w = put(TensorRef::new(&d.weights, &[t, k]).map_err(err)?)?;
    // Device barriers between calls take call numbers of their own: the calls after them must
    // still match.
    ep.barrier().map_err(err)?;
    let (out, handle) = ep
        .dispatch(x.view(), topk.view(), Some(w.view()), None)
        .map_err(err)?;
    let combined = ep.combine(&handle, out.x.view(), None).map_err(err)?;
    ep.barrier().map_err(err)?;
    let grad = ep
        .dispatch_backward(&handle, out.x.view(), None)
        .map_err(err)?;
    let cb = ep
        .combine_backward(&handle, combined.x.view(), None)
        .map_err(err)?;
    ep.synchronize().map_err(err)?;
    let rows = out.valid_rows().map_err(err)?;
    let bytes = |t: &moe_ep::Tensor| t.to_host().map(|t| t.host_bytes().to_vec()).map_err(err);
    let row_bytes = h * 2;
    let src = bytes(&out.src)?;
    // Payload rows that carry no token (expert-major padding) are unspecified: compare the rest.
    let src_cols = out.src.dims()[1];
    let is_padding: Vec<bool> = src
        .chunks_exact(4 * src_cols)
        .take(rows)
        .map(|row| i32::from_le_bytes(row[..4].try_into().expect("4 bytes")) == -1)
        .collect();
    let payload = |t: &moe_ep::Tensor| -> Result<Vec<u8>, String> {
        let mut b = bytes(t)?[..rows * row_bytes].to_vec();
        for (row, _) in b
            .chunks_exact_mut(row_bytes)
            .zip(&is_padding)
            .filter(|(_, &pad)| pad)
        {
            row.fill(0);
        }
        Ok(b)
    };
    Ok(vec![
        payload(&out.x)?,
        src,
        bytes(&combined.x)?,
        bytes(&grad.grad_x)?,
        payload(&cb.grad_y)?,
    ])
}

fn run_rank(group: &Group, config: &EpConfig, data: &[RankData]) -> Result<Vec<Vec<u8>>, String> {
    run_rank_on(group, config, data, false)
}

/// [`run_rank`] on every rank of a group of threads.
fn run_all(
    backend: &dyn BackendUnderTest,
    config: &EpConfig,
    data: &[RankData],
) -> Vec<Vec<Vec<u8>>> {
    run_ranks(backend, data.len(), |group| run_rank(&group, config, data))
        .expect("every rank succeeds")
}

const NAMES: [&str; 5] = [
    "dispatch x",
    "dispatch src",
    "combine",
    "dispatch_backward",
    "combine_backward",
];

fn config_for(layout: Layout, e: usize, k: usize, h: usize, t: usize) -> EpConfig {
    EpConfig::builder()
        .num_experts(e)
        .topk(k)
        .hidden(h)
        .max_tokens_per_rank(t)
        .layout(layout)
        .output_sizing(OutputSizing::Exact)
        .build()
        .expect("valid config")
}

/// Token-major with capacity-sized outputs (the default sizing: no call waits for the device).
fn capacity_sized(e: usize, k: usize, h: usize, t: usize) -> EpConfig {
    EpConfig::builder()
        .num_experts(e)
        .topk(k)
        .hidden(h)
        .max_tokens_per_rank(t)
        .build()
        .expect("valid config")
}

const LAYOUTS: [Layout; 2] = [Layout::TokenMajor, Layout::ExpertMajor { align: 16 }];
const SHAPE: (usize, usize, usize, usize) = (96, 512, 32, 8); // T, H, E, K

#[test]
fn cuda_matches_cpu_bit_for_bit_on_fresh_random_inputs() {
    let Some(cuda) = cuda_or_skip("cuda_matches_cpu_bit_for_bit_on_fresh_random_inputs") else {
        return;
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    let (t, h, e, k) = SHAPE;
    let data = random_inputs(seed, cpu_comparison_world(&cuda), t, h, e, k);
    for layout in LAYOUTS {
        let config = config_for(layout, e, k, h, t);
        let on_cpu = run_all(&CpuBackend, &config, &data);
        let on_gpu = run_all(&cuda, &config, &data);
        for (rank, (c, g)) in on_cpu.iter().zip(&on_gpu).enumerate() {
            for (name, (a, b)) in NAMES.iter().zip(c.iter().zip(g)) {
                assert!(
                    a == b,
                    "seed {seed}, {}, rank {rank}: {name} differs between cpu and cuda",
                    layout.name()
                );
            }
        }
    }
}

/// One process per rank (the usual deployment): this test starts `world` copies of its own test
/// binary as a torchrun-style launch would, each running `process_rank`.
#[test]
fn one_process_per_rank_matches_cpu_bit_for_bit() {
    let Some(cuda) = cuda_or_skip("one_process_per_rank_matches_cpu_bit_for_bit") else {
        return;
    };
    let world = cpu_comparison_world(&cuda);
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    let exe = std::env::current_exe().expect("the test binary");
    let outputs: Vec<_> = (0..world)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(["--ignored", "--exact", "process_rank", "--nocapture"])
                .env("RANK", r.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("MOE_EP_TEST_SEED", seed.to_string())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("starting a rank process")
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|c| c.wait_with_output().expect("a rank process finishes"))
        .collect();
    for (r, out) in outputs.iter().enumerate() {
        assert!(
            out.status.success(),
            "seed {seed}: rank process {r} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// One rank of `one_process_per_rank_matches_cpu_bit_for_bit`, in a process of its own: its CUDA
/// results must equal, bit for bit, what the CPU backend computes for that rank.
#[test]
#[ignore = "a rank process of one_process_per_rank_matches_cpu_bit_for_bit, which starts it"]
fn process_rank() {
    let seed: u64 = std::env::var("MOE_EP_TEST_SEED")
        .expect("started by the parent test")
        .parse()
        .expect("a seed");
    let group = Group::from_env().expect("a torchrun-style environment");
    let (rank, world) = (group.rank(), group.world());
    let (t, h, e, k) = SHAPE;
    let data = random_inputs(seed, world, t, h, e, k);
    for layout in LAYOUTS {
        let config = config_for(layout, e, k, h, t);
        let on_gpu = run_rank(&group, &config, &data).expect("the CUDA rank succeeds");
        let on_cpu = run_all(&CpuBackend, &config, &data).swap_remove(rank);
        for (name, (a, b)) in NAMES.iter().zip(on_cpu.iter().zip(&on_gpu)) {
            assert!(
                a == b,
                "seed {seed}, {}, rank {rank}: {name} differs between cpu and cuda",
                layout.name()
            );
        }
    }
}

#[test]
fn a_missing_rank_is_a_timeout_naming_it() {
    let Some(cuda) = cuda_or_skip("a_missing_rank_is_a_timeout_naming_it") else {
        return;
    };
    let timeout = Duration::from_millis(500);
    let config = EpConfig::builder()
        .num_experts(4)
        .topk(2)
        .hidden(64)
        .max_tokens_per_rank(8)
        .timeout(timeout)
        .build()
        .expect("valid config");
    // Rank 1 keeps its dispatcher (and the memory rank 0 writes into) until rank 0 has given up.
    let rank0_done = Barrier::new(2);
    let results = run_ranks(&cuda, 2, |group| {
        let err = |e: EpError| e.to_string();
        let mut ep = Dispatcher::new(&group, config.clone()).map_err(err)?;
        if group.rank() == 1 {
            rank0_done.wait();
            return Ok(None); // never dispatches
        }
        let x = vec![bf16::ONE; 8 * 64];
        let topk = vec![0i32, 3, 1, 2, 3, 3, 0, 0, 1, 1, 2, 2, 3, 0, 1, 2];
        let x = ep
            .to_device(TensorRef::new(&x, &[8, 64]).map_err(err)?)
            .map_err(err)?;
        let topk = ep
            .to_device(TensorRef::new(&topk, &[8, 2]).map_err(err)?)
            .map_err(err)?;
        let start = Instant::now();
        ep.dispatch(x.view(), topk.view(), None, None)
            .map_err(err)?;
        let got = ep.synchronize();
        let waited = start.elapsed();
        let again = ep.synchronize();
        rank0_done.wait();
        Ok(Some((got, waited, again)))
    })
    .expect("ranks run");
    let (got, waited, again) = results[0].clone().expect("rank 0 dispatched");
    match got {
        Err(EpError::Timeout {
            rank: 0, missing, ..
        }) => assert_eq!(missing, vec![1]),
        other => panic!("expected a timeout naming rank 1, got {other:?}"),
    }
    assert!(
        waited >= timeout,
        "gave up after {waited:?}, before the {timeout:?} timeout"
    );
    assert!(
        waited < timeout * 20,
        "took {waited:?} for a {timeout:?} timeout"
    );
    assert!(
        matches!(again, Err(EpError::Timeout { .. })),
        "the dispatcher stays poisoned: {again:?}"
    );
}

/// Dispatch then combine on one rank (capacity-sized outputs), the combined tokens as bytes.
fn dispatch_combine(group: &Group, config: &EpConfig, d: &RankData) -> Result<Vec<u8>, String> {
    let (t, h, k) = (d.x.len() / config.hidden(), config.hidden(), config.topk());
    let err = |e: EpError| e.to_string();
    let mut ep = Dispatcher::new(group, config.clone()).map_err(err)?;
    let x = TensorRef::new(&d.x, &[t, h]).map_err(err)?;
    let topk = TensorRef::new(&d.topk, &[t, k]).map_err(err)?;
    let w = TensorRef::new(&d.weights, &[t, k]).map_err(err)?;
    let (out, handle) = ep.dispatch(x, topk, Some(w), None).map_err(err)?;
    let c = ep.combine(&handle, out.x.view(), None).map_err(err)?;
    Ok(c.x.host_bytes().to_vec())
}

/// Dispatch and combine recorded once into a CUDA graph on every rank, then replayed with new data
/// written into the same input tensors: each replay equals, bit for bit, what the CPU backend
/// computes for that data, and leaves an eager output held meanwhile untouched. One rank per GPU: replayed graphs of ranks sharing a GPU were seen not
/// to run side by side, and these ranks wait for each other inside kernels.
#[test]
fn dispatch_and_combine_replay_from_a_cuda_graph() {
    let Some(cuda) = cuda_or_skip("dispatch_and_combine_replay_from_a_cuda_graph") else {
        return;
    };
    let (t, h, e, k) = SHAPE;
    let world = cuda.distinct_devices().min(4);
    let cuda = CudaLocal::from_devices((0..world as u32).collect());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as u64;
    let rounds: Vec<Vec<RankData>> = (0..3)
        .map(|i| random_inputs(seed + i, world, t, h, e, k))
        .collect();
    for layout in LAYOUTS {
        let config = EpConfig::builder()
            .num_experts(e)
            .topk(k)
            .hidden(h)
            .max_tokens_per_rank(t)
            .layout(layout)
            .build()
            .expect("valid config");
        let expected: Vec<Vec<Vec<u8>>> = rounds
            .iter()
            .map(|data| {
                run_ranks(&CpuBackend, world, |g| {
                    dispatch_combine(&g, &config, &data[g.rank()])
                })
                .expect("the cpu reference runs")
            })
            .collect();
        let replays = run_ranks(&cuda, world, |group| {
            let rank = group.rank();
            let err = |e: EpError| e.to_string();
            let mut ep = Dispatcher::new(&group, config.clone()).map_err(err)?;
            let first = &rounds[0][rank];
            let mut x = ep
                .to_device(TensorRef::new(&first.x, &[t, h]).map_err(err)?)
                .map_err(err)?;
            let mut topk = ep
                .to_device(TensorRef::new(&first.topk, &[t, k]).map_err(err)?)
                .map_err(err)?;
            let mut w = ep
                .to_device(TensorRef::new(&first.weights, &[t, k]).map_err(err)?)
                .map_err(err)?;
            let zeros = vec![bf16::ZERO; t * h];
            let mut result = ep
                .to_device(TensorRef::new(&zeros, &[t, h]).map_err(err)?)
                .map_err(err)?;
            let graph = ep
                .capture_graph(|ep| {
                    let (out, handle) = ep.dispatch(x.view(), topk.view(), Some(w.view()), None)?;
                    let combined = ep.combine(&handle, out.x.view(), None)?;
                    result.copy_from(combined.x.view())
                })
                .map_err(err)?;
            // An eager dispatch whose output is held across the replays: it must not be handed
            // out from the receive slot the graph writes into on every replay.
            let (held, _held_handle) = ep
                .dispatch(x.view(), topk.view(), Some(w.view()), None)
                .map_err(err)?;
            let held_before = held.x.to_host().map_err(err)?.host_bytes().to_vec();
            let mut got = Vec::new();
            for round in &rounds {
                let d = &round[rank];
                x.copy_from(TensorRef::new(&d.x, &[t, h]).map_err(err)?)
                    .map_err(err)?;
                topk.copy_from(TensorRef::new(&d.topk, &[t, k]).map_err(err)?)
                    .map_err(err)?;
                w.copy_from(TensorRef::new(&d.weights, &[t, k]).map_err(err)?)
                    .map_err(err)?;
                graph.replay().map_err(err)?;
                ep.synchronize().map_err(err)?;
                got.push(result.to_host().map_err(err)?.host_bytes().to_vec());
            }
            if held.x.to_host().map_err(err)?.host_bytes() != held_before {
                return Err("a replay overwrote a dispatch output held by the caller".into());
            }
            Ok(got)
        })
        .expect("every rank captures and replays");
        for (rank, per_round) in replays.iter().enumerate() {
            for (i, got) in per_round.iter().enumerate() {
                assert!(
                    *got == expected[i][rank],
                    "seed {seed}, {}, rank {rank}, replay {i}: combine differs from the cpu backend",
                    layout.name()
                );
            }
        }
    }
}

#[test]
fn graph_capture_needs_the_cuda_backend() {
    let config = config_for(Layout::TokenMajor, 4, 2, 8, 4);
    let groups = Group::cpu_world(1).expect("one cpu rank");
    let mut ep = Dispatcher::new(&groups[0], config).expect("a cpu dispatcher");
    let err = ep
        .capture_graph(|_| Ok(()))
        .expect_err("the cpu backend has no graphs");
    assert!(
        matches!(err, EpError::BackendUnavailable { backend: "cpu", .. }),
        "{err}"
    );
}

/// An expert id out of range in device memory: the kernels never read or write out of bounds, the
/// next synchronization names the slot and the id, and the dispatcher goes on working.
#[test]
fn expert_ids_out_of_range_on_the_device_are_reported() {
    let Some(cuda) = cuda_or_skip("expert_ids_out_of_range_on_the_device_are_reported") else {
        return;
    };
    let (t, h, e, k) = (4, 64, 4, 2);
    let config = capacity_sized(e, k, h, t);
    let results = run_ranks(&cuda, 2, |group| {
        let err = |e: EpError| e.to_string();
        let mut ep = Dispatcher::new(&group, config.clone()).map_err(err)?;
        let x = vec![bf16::ONE; t * h];
        let good = vec![0i32, 3, 1, 2, 2, -1, 3, 0];
        // Rank 0's token 2, slot 1 names expert 99 of 4; rank 1's ids are all valid.
        let mut bad = good.clone();
        if group.rank() == 0 {
            bad[5] = 99;
        }
        let x = ep
            .to_device(TensorRef::new(&x, &[t, h]).map_err(err)?)
            .map_err(err)?;
        let bad = ep
            .to_device(TensorRef::new(&bad, &[t, k]).map_err(err)?)
            .map_err(err)?;
        let good = ep
            .to_device(TensorRef::new(&good, &[t, k]).map_err(err)?)
            .map_err(err)?;
        ep.dispatch(x.view(), bad.view(), None, None).map_err(err)?;
        let reported = ep.synchronize();
        let (out, handle) = ep
            .dispatch(x.view(), good.view(), None, None)
            .map_err(err)?;
        ep.combine(&handle, out.x.view(), None).map_err(err)?;
        let after = ep.synchronize();
        Ok((reported, after))
    })
    .expect("ranks run");
    let (reported, after) = &results[0];
    assert_eq!(
        *reported,
        Err(EpError::ExpertOutOfRange {
            arg: "topk_idx",
            row: 2,
            col: 1,
            value: 99,
            num_experts: 4
        })
    );
    assert_eq!(*after, Ok(()), "the dispatcher works on after the report");
    assert_eq!(results[1], (Ok(()), Ok(())), "rank 1 gave valid ids");
}

/// Calls made on the caller's stream (`Dispatcher::set_cuda_stream`) give, bit for bit, what the
/// CPU backend computes.
#[test]
fn calls_on_the_callers_stream_match_cpu() {
    let Some(cuda) = cuda_or_skip("calls_on_the_callers_stream_match_cpu") else {
        return;
    };
    let (t, h, e, k) = SHAPE;
    let data = random_inputs(7, 4, t, h, e, k);
    for layout in LAYOUTS {
        let config = config_for(layout, e, k, h, t);
        let on_cpu = run_all(&CpuBackend, &config, &data);
        let on_gpu = run_ranks(&cuda, 4, |g| run_rank_on(&g, &config, &data, true))
            .expect("every rank succeeds");
        for (rank, (c, g)) in on_cpu.iter().zip(&on_gpu).enumerate() {
            for (name, (a, b)) in NAMES.iter().zip(c.iter().zip(g)) {
                assert!(
                    a == b,
                    "{}, rank {rank}: {name} differs between cpu and cuda",
                    layout.name()
                );
            }
        }
    }
}

#[test]
fn a_cpu_dispatcher_takes_no_cuda_stream() {
    let config = config_for(Layout::TokenMajor, 4, 2, 8, 4);
    let groups = Group::cpu_world(1).expect("one cpu rank");
    assert_eq!(groups[0].device(), Device::Host);
    let mut ep = Dispatcher::new(&groups[0], config).expect("a cpu dispatcher");
    assert_eq!(ep.cuda_stream(), None);
    // SAFETY: the CPU backend refuses before using the (meaningless) handle.
    let err = unsafe { ep.set_cuda_stream(1) }.expect_err("the cpu backend has no streams");
    assert!(
        matches!(err, EpError::BackendUnavailable { backend: "cpu", .. }),
        "{err}"
    );
}

#[test]
fn a_held_timer_times_the_device_not_the_host() {
    let Some(cuda) = cuda_or_skip("a_held_timer_times_the_device_not_the_host") else {
        return;
    };
    let (t, h, e, k) = SHAPE;
    // Capacity-sized outputs: an exact-sized call waits for the device, opening the hold.
    let config = capacity_sized(e, k, h, t);
    let data = random_inputs(11, 2, t, h, e, k);
    let host_pause = Duration::from_millis(200);
    let times = run_ranks(&cuda, 2, |group| {
        let err = |e: EpError| e.to_string();
        let mut ep = Dispatcher::new(&group, config.clone()).map_err(err)?;
        let d = &data[group.rank()];
        let x = ep
            .to_device(TensorRef::new(&d.x, &[t, h]).map_err(err)?)
            .map_err(err)?;
        let topk = ep
            .to_device(TensorRef::new(&d.topk, &[t, k]).map_err(err)?)
            .map_err(err)?;
        // Two dispatches with the host away between them: as queued, the device waits for it.
        let mut span = |held: bool| -> Result<Duration, String> {
            let timer = match held {
                true => ep.timer_held(),
                false => ep.timer_together(),
            }
            .map_err(err)?;
            drop(
                ep.dispatch(x.view(), topk.view(), None, None)
                    .map_err(err)?,
            );
            std::thread::sleep(host_pause);
            drop(
                ep.dispatch(x.view(), topk.view(), None, None)
                    .map_err(err)?,
            );
            let took = timer.stop(&ep).map_err(err)?;
            ep.synchronize().map_err(err)?;
            Ok(took)
        };
        span(true)?; // warm-up
        Ok((span(false)?, span(true)?))
    })
    .expect("every rank succeeds");
    for (rank, (queued, held)) in times.into_iter().enumerate() {
        assert!(
            queued >= host_pause,
            "rank {rank}: {queued:?} as queued, less than the host's {host_pause:?} pause"
        );
        assert!(
            held < host_pause / 4,
            "rank {rank}: {held:?} when held, which should leave out the host's {host_pause:?} pause"
        );
    }
}
