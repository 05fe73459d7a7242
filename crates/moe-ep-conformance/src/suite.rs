//! The conformance suite: cases written once, run against any backend, each checked bit for bit
//! against the [`crate::oracle`].
//!
//! A backend plugs in through [`BackendUnderTest`] (it makes the groups). Every input a case hands
//! to the library goes through [`Staged`] (host memory today; the one place a device-memory adapter
//! would upload), and every output is read back through [`fetch`].
//!
//! Each case is a `pub fn(&dyn BackendUnderTest) -> Result<(), String>`; [`CASES`] lists them and
//! [`crate::conformance_tests!`] expands to one `#[test]` per case.

use crate::oracle::{self, ExpectedDispatch, Problem, RankInput};
use moe_ep::{
    CachedDispatchOutput, CombineBackwardOutput, CombineOutput, DType, DispatchBackwardOutput,
    DispatchOutput, Dispatcher, EpConfig, Group, Handle, Layout, OutputSizing, PlacementSpec,
    Tensor, TensorRef,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// A backend the suite can run on.
pub trait BackendUnderTest: Sync {
    /// A short name for messages (e.g. "cpu").
    fn name(&self) -> String;
    /// One [`Group`] per rank of a `world`-rank group, in rank order.
    fn groups(&self, world: usize) -> Result<Vec<Group>, String>;
}

/// The CPU backend: ranks are threads of this process.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl BackendUnderTest for CpuBackend {
    fn name(&self) -> String {
        "cpu".into()
    }
    fn groups(&self, world: usize) -> Result<Vec<Group>, String> {
        Group::cpu_world(world).map_err(|e| e.to_string())
    }
}

/// CUDA ranks driven by threads of this process, placed round-robin on `devices` (so a world
/// larger than the GPU count puts several ranks on one GPU).
#[derive(Debug, Clone)]
pub struct CudaLocal {
    devices: Vec<u32>,
}

impl CudaLocal {
    /// The GPUs listed in `MOE_EP_TEST_DEVICES` (e.g. `0,0,0,0`: four ranks on GPU 0), else every
    /// GPU the driver reports; `Err` says why the CUDA backend cannot run here.
    pub fn from_env() -> Result<CudaLocal, String> {
        let status = moe_ep::probe::backends()
            .into_iter()
            .find(|b| b.name == "cuda")
            .ok_or("this build has no cuda backend")?;
        if !status.available {
            return Err(status.detail);
        }
        let devices = match std::env::var("MOE_EP_TEST_DEVICES") {
            Ok(list) => list
                .split(',')
                .map(|d| {
                    d.trim()
                        .parse()
                        .map_err(|_| format!("MOE_EP_TEST_DEVICES: `{d}` is not a device ordinal"))
                })
                .collect::<Result<Vec<u32>, String>>()?,
            Err(_) => moe_ep::probe::cuda_devices()?
                .iter()
                .map(|d| d.ordinal)
                .collect(),
        };
        if devices.is_empty() {
            return Err("no CUDA device".into());
        }
        // The suite's largest world (8) shares GPUs unless there are 8 of them, and moe-ep refuses
        // to put ranks on one GPU without a hardware queue each (see Group::cuda_local).
        let mut distinct = devices.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let per_gpu = 8usize.div_ceil(distinct.len());
        let queues: usize = std::env::var("CUDA_DEVICE_MAX_CONNECTIONS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(8);
        if per_gpu > 1 && queues < 2 * per_gpu {
            return Err(format!(
                "up to {per_gpu} ranks share a GPU here: set CUDA_DEVICE_MAX_CONNECTIONS >= {} \
                 (scripts/gpu-suite.sh sets 32)",
                2 * per_gpu
            ));
        }
        Ok(CudaLocal { devices })
    }
}

impl CudaLocal {
    /// Ranks placed round-robin on exactly these GPUs.
    pub fn from_devices(devices: Vec<u32>) -> CudaLocal {
        CudaLocal { devices }
    }

    /// How many different GPUs the ranks are placed on.
    pub fn distinct_devices(&self) -> usize {
        let mut d = self.devices.clone();
        d.sort_unstable();
        d.dedup();
        d.len()
    }
}

impl BackendUnderTest for CudaLocal {
    fn name(&self) -> String {
        format!("cuda (devices {:?})", self.devices)
    }
    fn groups(&self, world: usize) -> Result<Vec<Group>, String> {
        let placed: Vec<u32> = (0..world)
            .map(|r| self.devices[r % self.devices.len()])
            .collect();
        Group::cuda_local(&placed).map_err(|e| e.to_string())
    }
}

/// Says why a test does not run, on stderr directly: the test harness captures `eprintln!` of
/// passing tests, and a skip must never be silent.
pub fn print_skip(test: &str, reason: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// An input tensor as handed to the library: 8-byte aligned host memory, with its shape and dtype.
/// This is the single place where test inputs are materialized for the backend.
#[derive(Debug, Clone)]
pub struct Staged {
    words: Vec<u64>,
    len: usize,
    dims: Vec<usize>,
    dtype: DType,
}

impl Staged {
    pub fn new(bytes: &[u8], dims: &[usize], dtype: DType) -> Staged {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Staged {
            words,
            len: bytes.len(),
            dims: dims.to_vec(),
            dtype,
        }
    }
    pub fn f32(v: &[f32], dims: &[usize]) -> Staged {
        Staged::new(bytemuck::cast_slice(v), dims, DType::F32)
    }
    pub fn i32(v: &[i32], dims: &[usize]) -> Staged {
        Staged::new(bytemuck::cast_slice(v), dims, DType::I32)
    }
    pub fn i64(v: &[i64], dims: &[usize]) -> Staged {
        Staged::new(bytemuck::cast_slice(v), dims, DType::I64)
    }
    /// The view the library takes.
    pub fn view(&self) -> TensorRef<'_> {
        let bytes = &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len];
        TensorRef::from_bytes(bytes, &self.dims, self.dtype).expect("staged tensor is consistent")
    }
}

/// The bytes of an output tensor, on the host.
pub fn fetch(t: &Tensor) -> Vec<u8> {
    t.to_host()
        .expect("reading an output back to the host")
        .host_bytes()
        .to_vec()
}

/// A staged input copied to where `ep` takes its inputs (device memory for a GPU backend).
pub fn put(ep: &Dispatcher, s: &Staged) -> Result<Tensor, String> {
    ep.to_device(s.view())
        .map_err(|e| format!("to_device: {e}"))
}

fn put_opt(ep: &Dispatcher, s: &Option<Staged>) -> Result<Option<Tensor>, String> {
    s.as_ref().map(|s| put(ep, s)).transpose()
}

/// Waits for `ep`'s queued work; errors the device found surface here.
pub fn settle(ep: &mut Dispatcher, what: &str) -> Result<(), String> {
    ep.synchronize()
        .map_err(|e| format!("{what}: synchronize: {e}"))
}

fn host<T>(r: moe_ep::Result<T>, what: &str) -> Result<T, String> {
    r.map_err(|e| format!("{what}: reading back: {e}"))
}

/// Runs `f` on every rank of a `world`-rank group, each on its own thread, and collects the
/// results in rank order. A panicking rank becomes an error.
pub fn run_ranks<R: Send>(
    backend: &dyn BackendUnderTest,
    world: usize,
    f: impl Fn(Group) -> Result<R, String> + Sync,
) -> Result<Vec<R>, String> {
    let groups = backend.groups(world)?;
    if groups.len() != world {
        return Err(format!(
            "backend {}: asked for {world} groups, got {}",
            backend.name(),
            groups.len()
        ));
    }
    let f = &f;
    let results: Vec<Result<R, String>> = std::thread::scope(|s| {
        let joins: Vec<_> = groups.into_iter().map(|g| s.spawn(move || f(g))).collect();
        joins
            .into_iter()
            .enumerate()
            .map(|(r, j)| match j.join() {
                Ok(res) => res,
                Err(p) => Err(format!(
                    "rank {r} panicked: {}",
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default()
                )),
            })
            .collect()
    });
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().cloned())
        .collect();
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    Ok(results.into_iter().map(|r| r.ok().unwrap()).collect())
}

// ---------------------------------------------------------------------------------------------
// Input generation

/// How floating-point test data is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// Random finite values in [-4, 4), rounded to the dtype.
    Random,
    /// Small integers in [-3, 3] (exact in every dtype and in f32 sums): for identities.
    SmallInt,
    /// Mostly signed zeros (-0.0 and +0.0), some ±1.5: checks the +0.0 start of every sum.
    SignedZeros,
}

fn draw(rng: &mut StdRng, values: Values) -> f32 {
    match values {
        Values::Random => rng.random_range(-4.0f32..4.0),
        Values::SmallInt => rng.random_range(-3i32..=3) as f32,
        Values::SignedZeros => [-0.0, 0.0, -0.0, -0.0, 1.5, -1.5][rng.random_range(0..6)],
    }
}

/// `n` random elements of `dtype` as bytes (fp8: any byte but the NaN encodings 0x7f / 0xff).
pub fn random_payload(rng: &mut StdRng, dtype: DType, n: usize, values: Values) -> Vec<u8> {
    let mut out = vec![0u8; n * dtype.size()];
    for i in 0..n {
        match dtype {
            DType::Fp8E4M3 => {
                out[i] = loop {
                    let b: u8 = rng.random();
                    if b & 0x7f != 0x7f {
                        break b;
                    }
                }
            }
            _ => {
                let v = draw(rng, values);
                oracle::narrow(dtype, v, &mut out, i);
            }
        }
    }
    // Never all zeros: make the first element nonzero.
    if n > 0 && out.iter().all(|&b| b == 0) {
        match dtype {
            DType::Fp8E4M3 => out[0] = 0x38,
            _ => oracle::narrow(dtype, 1.0, &mut out, 0),
        }
    }
    out
}

/// `n` random f32 values (weights, scales).
pub fn random_f32(rng: &mut StdRng, n: usize, values: Values) -> Vec<f32> {
    (0..n)
        .map(|_| match values {
            Values::Random => rng.random_range(-2.0f32..2.0),
            Values::SignedZeros => [-0.0, 0.0, -1.0, 1.0][rng.random_range(0..4)],
            Values::SmallInt => {
                let v = rng.random_range(-2i32..=2);
                if v == 0 {
                    1.0
                } else {
                    v as f32
                }
            }
        })
        .collect()
}

/// How `topk_idx` is drawn.
#[derive(Debug, Clone, PartialEq)]
pub enum Routing {
    /// Each slot an expert uniformly, or -1 with probability `drop`; duplicates happen naturally
    /// when `distinct` is false.
    Random { drop: f64, distinct: bool },
    /// Every row has duplicate ids: slot 1 repeats slot 0 (and slot 3 slot 2), the rest random.
    Duplicates,
    /// Cycles through the -1 patterns per token: all -1, every other slot, first only, last 1,
    /// last K-1, none.
    DropPatterns,
    /// Exactly these ids, per rank (`[T_r * K]`); the token counts must match.
    Fixed(Vec<Vec<i32>>),
}

/// `[t, k]` expert ids.
pub fn random_routing(
    rng: &mut StdRng,
    t: usize,
    k: usize,
    e: usize,
    routing: &Routing,
) -> Vec<i32> {
    let mut idx = vec![-1i32; t * k];
    for tt in 0..t {
        let row = &mut idx[tt * k..(tt + 1) * k];
        match routing {
            Routing::Fixed(_) => unreachable!("fixed routing is not drawn"),
            &Routing::Random { drop, distinct } => {
                let mut taken: Vec<i32> = Vec::new();
                for slot in row.iter_mut() {
                    if rng.random_bool(drop) {
                        continue;
                    }
                    let v = loop {
                        let v = rng.random_range(0..e as i32);
                        if !distinct || !taken.contains(&v) || taken.len() >= e {
                            break v;
                        }
                    };
                    taken.push(v);
                    *slot = v;
                }
            }
            Routing::Duplicates => {
                for slot in row.iter_mut() {
                    *slot = rng.random_range(0..e as i32);
                }
                for j in (1..k).step_by(2) {
                    row[j] = row[j - 1];
                }
            }
            Routing::DropPatterns => {
                for slot in row.iter_mut() {
                    *slot = rng.random_range(0..e as i32);
                }
                let pattern = tt % 6;
                for (j, slot) in row.iter_mut().enumerate() {
                    let dropped = match pattern {
                        0 => true,
                        1 => j % 2 == 1,
                        2 => j == 0,
                        3 => j == k - 1,
                        4 => j >= 1 && k > 1,
                        _ => false,
                    };
                    if dropped {
                        *slot = -1;
                    }
                }
            }
        }
    }
    idx
}

// ---------------------------------------------------------------------------------------------
// Scenario

/// One conformance scenario: a configuration, per-rank token counts and how data is drawn. Run
/// with [`run_scenario`].
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub world: usize,
    pub num_experts: usize,
    pub topk: usize,
    pub hidden: usize,
    pub max_tokens: usize,
    /// Tokens per rank (one entry per rank), or None for `max_tokens` minus a little per rank.
    pub tokens: Option<Vec<usize>>,
    pub dtype: DType,
    pub combine_dtype: Option<DType>,
    pub layout: Layout,
    pub scale_columns: usize,
    pub weights: bool,
    pub placement: Option<Vec<usize>>,
    pub sizing: OutputSizing,
    /// A receive capacity smaller than the worst case.
    pub recv_capacity: Option<usize>,
    pub routing: Routing,
    /// Pass weights to combine (token-major `[rows, K]`, expert-major `[rows]`).
    pub combine_weights: bool,
    /// Hand `y` and the gradients back with more rows than the valid ones.
    pub extra_rows: bool,
    /// Dispatches made before any combine (handles alive at once); combined in reverse order.
    pub layers: usize,
    /// Pass topk_idx as i64.
    pub topk_i64: bool,
    pub values: Values,
    pub seed: u64,
}

impl Scenario {
    pub fn new(name: &str, layout: Layout) -> Scenario {
        Scenario {
            name: name.into(),
            world: 2,
            num_experts: 8,
            topk: 4,
            hidden: 16,
            max_tokens: 8,
            tokens: None,
            dtype: DType::BF16,
            combine_dtype: None,
            layout,
            scale_columns: 0,
            weights: true,
            placement: None,
            sizing: OutputSizing::Capacity,
            recv_capacity: None,
            routing: Routing::Random {
                drop: 0.15,
                distinct: false,
            },
            combine_weights: false,
            extra_rows: false,
            layers: 1,
            topk_i64: false,
            values: Values::Random,
            seed: 0x5eed,
        }
    }

    /// The dispatcher configuration.
    pub fn config(&self) -> Result<EpConfig, String> {
        let mut b = EpConfig::builder()
            .num_experts(self.num_experts)
            .topk(self.topk)
            .hidden(self.hidden)
            .max_tokens_per_rank(self.max_tokens)
            .dtype(self.dtype)
            .layout(self.layout)
            .scale_columns(self.scale_columns)
            .output_sizing(self.sizing)
            // A failing rank must not hang the others for the 60 s default.
            .timeout(Duration::from_secs(20));
        if let Some(cd) = self.combine_dtype {
            b = b.combine_dtype(cd);
        }
        if let Some(c) = self.recv_capacity {
            b = b.recv_capacity(c);
        }
        if let Some(t) = &self.placement {
            b = b.placement(PlacementSpec::Table(t.clone()));
        }
        b.build().map_err(|e| format!("{}: config: {e}", self.name))
    }

    fn tokens_of(&self, rank: usize) -> usize {
        match &self.tokens {
            Some(t) => t[rank],
            None => self.max_tokens.saturating_sub(rank % 3),
        }
    }
}

/// Everything of one layer: inputs, what is handed back, and the oracle's answers.
#[derive(Debug, Clone)]
pub struct LayerData {
    pub inputs: Vec<RankInput>,
    pub dispatch: Vec<ExpectedDispatch>,
    /// Per rank d: combine's y, `[y_rows[d], H]` combine dtype.
    pub y: Vec<Vec<u8>>,
    pub y_rows: Vec<usize>,
    pub combine_weights: Option<Vec<Vec<f32>>>,
    pub combine: Vec<oracle::ExpectedCombine>,
    /// The payload of the cached dispatch (x, scales) and its expected output.
    pub cached_inputs: Vec<RankInput>,
    pub cached: Vec<ExpectedDispatch>,
    pub grad_recv: Vec<Vec<u8>>,
    pub grad_recv_weights: Option<Vec<Vec<f32>>>,
    pub dispatch_backward: Vec<(Vec<u8>, Option<Vec<f32>>)>,
    pub grad_out: Vec<Vec<u8>>,
    pub combine_backward: (Vec<Vec<u8>>, Vec<Option<Vec<f32>>>),
}

/// Builds the inputs of every layer of `sc` and the oracle's answers.
pub fn prepare(sc: &Scenario, p: &Problem) -> Vec<LayerData> {
    let mut rng = StdRng::seed_from_u64(sc.seed);
    let (k, h, cd) = (sc.topk, sc.hidden, p.combine_dtype);
    let expert_major = !matches!(sc.layout, Layout::TokenMajor);
    (0..sc.layers)
        .map(|_| {
            let inputs: Vec<RankInput> = (0..sc.world)
                .map(|r| {
                    let t = sc.tokens_of(r);
                    RankInput {
                        num_tokens: t,
                        x: random_payload(&mut rng, sc.dtype, t * h, sc.values),
                        topk_idx: match &sc.routing {
                            Routing::Fixed(ids) => ids[r].clone(),
                            other => random_routing(&mut rng, t, k, sc.num_experts, other),
                        },
                        weights: sc.weights.then(|| random_f32(&mut rng, t * k, sc.values)),
                        scales: (sc.scale_columns > 0)
                            .then(|| random_f32(&mut rng, t * sc.scale_columns, sc.values)),
                    }
                })
                .collect();
            let dispatch = oracle::dispatch(p, &inputs);
            let extra = if sc.extra_rows { 3 } else { 0 };
            let y_rows: Vec<usize> = dispatch.iter().map(|d| d.rows + extra).collect();
            let y: Vec<Vec<u8>> = y_rows
                .iter()
                .map(|&n| random_payload(&mut rng, cd, n * h, sc.values))
                .collect();
            let wcols = if expert_major { 1 } else { k };
            let combine_weights = sc.combine_weights.then(|| {
                y_rows
                    .iter()
                    .map(|&n| random_f32(&mut rng, n * wcols, sc.values))
                    .collect::<Vec<_>>()
            });
            let combine = oracle::combine(p, &inputs, &y, combine_weights.as_deref());
            let cached_inputs: Vec<RankInput> = inputs
                .iter()
                .map(|i| RankInput {
                    x: random_payload(&mut rng, sc.dtype, i.num_tokens * h, sc.values),
                    scales: i
                        .scales
                        .as_ref()
                        .map(|s| random_f32(&mut rng, s.len(), sc.values)),
                    ..i.clone()
                })
                .collect();
            let cached = oracle::dispatch(p, &cached_inputs);
            let grad_recv: Vec<Vec<u8>> = y_rows
                .iter()
                .map(|&n| random_payload(&mut rng, cd, n * h, sc.values))
                .collect();
            let grad_recv_weights = sc.weights.then(|| {
                y_rows
                    .iter()
                    .map(|&n| random_f32(&mut rng, n * wcols, sc.values))
                    .collect::<Vec<_>>()
            });
            let dispatch_backward =
                oracle::dispatch_backward(p, &inputs, &grad_recv, grad_recv_weights.as_deref());
            let grad_out: Vec<Vec<u8>> = inputs
                .iter()
                .map(|i| random_payload(&mut rng, cd, i.num_tokens * h, sc.values))
                .collect();
            let combine_backward =
                oracle::combine_backward(p, &inputs, &grad_out, expert_major.then_some(&y[..]));
            LayerData {
                inputs,
                dispatch,
                y,
                y_rows,
                combine_weights,
                combine,
                cached_inputs,
                cached,
                grad_recv,
                grad_recv_weights,
                dispatch_backward,
                grad_out,
                combine_backward,
            }
        })
        .collect()
}

/// What one rank saw, per layer: the valid rows of dispatch's x and weights, combine's output,
/// and the backward outputs (for identities checked across ranks).
#[derive(Debug, Clone, Default)]
pub struct RankOutputs {
    pub recv_x: Vec<Vec<u8>>,
    pub recv_weights: Vec<Option<Vec<f32>>>,
    pub combine_x: Vec<Vec<u8>>,
    pub grad_x: Vec<Vec<u8>>,
    pub grad_weights: Vec<Option<Vec<f32>>>,
    pub grad_y: Vec<Vec<u8>>,
    pub combine_grad_weights: Vec<Option<Vec<f32>>>,
}

fn check_tensor(
    what: &str,
    t: &Tensor,
    dtype: DType,
    dims: &[usize],
    expected: &[u8],
    skip: Option<&[bool]>,
) -> Result<(), String> {
    if t.dtype() != dtype {
        return Err(format!("{what}: expected dtype {dtype}, got {}", t.dtype()));
    }
    if t.dims() != dims {
        return Err(format!(
            "{what}: expected shape {dims:?}, got {:?}",
            t.dims()
        ));
    }
    let cols: usize = dims.iter().skip(1).product();
    oracle::compare_rows(
        what,
        dtype,
        cols,
        dims.first().copied().unwrap_or(1),
        skip,
        expected,
        t.host_bytes(),
    )
}

/// A capacity-sized output: `dtype`, `cols` wide, at least `rows` rows, whose first `rows` rows
/// (but the `padding` ones) equal `expected`; the rows past them are unspecified.
fn check_leading_rows(
    what: &str,
    t: &Tensor,
    dtype: DType,
    cols: usize,
    rows: usize,
    padding: &[bool],
    expected: &[u8],
) -> Result<(), String> {
    if t.dtype() != dtype || t.dims().get(1) != Some(&cols) || t.rows() < rows {
        return Err(format!(
            "{what}: expected [>= {rows}, {cols}] {dtype}, got {:?} {}",
            t.dims(),
            t.dtype()
        ));
    }
    oracle::compare_rows(
        what,
        dtype,
        cols,
        rows,
        Some(padding),
        expected,
        t.host_bytes(),
    )
}

fn opt_f32(
    what: &str,
    expected: &Option<Vec<f32>>,
    actual: &Option<Tensor>,
    dims: &[usize],
) -> Result<(), String> {
    match (expected, actual) {
        (None, None) => Ok(()),
        (Some(_), None) => Err(format!("{what}: expected a tensor, got none")),
        (None, Some(_)) => Err(format!("{what}: expected none, got a tensor")),
        (Some(e), Some(a)) => {
            check_tensor(what, a, DType::F32, dims, bytemuck::cast_slice(e), None)
        }
    }
}

/// The config, oracle problem and layer data of a scenario.
pub fn setup(sc: &Scenario) -> Result<(EpConfig, Problem, Vec<LayerData>), String> {
    let config = sc.config()?;
    let p = Problem::from_config(&config, sc.world);
    let layers = prepare(sc, &p);
    Ok((config, p, layers))
}

/// Runs `sc` on `backend`: every layer's dispatch, then in reverse layer order combine, cached
/// dispatch, dispatch_backward and combine_backward, each compared with the oracle bit for bit.
pub fn run_scenario(
    backend: &dyn BackendUnderTest,
    sc: &Scenario,
) -> Result<(Vec<LayerData>, Vec<RankOutputs>), String> {
    let config = sc.config()?;
    let p = Problem::from_config(&config, sc.world);
    let layers = prepare(sc, &p);
    let name = format!("[{} / {}]", backend.name(), sc.name);
    let outs = run_ranks(backend, sc.world, |group| {
        run_rank(sc, &config, &p, &layers, group).map_err(|e| format!("{name} {e}"))
    })?;
    Ok((layers, outs))
}

fn run_rank(
    sc: &Scenario,
    config: &EpConfig,
    p: &Problem,
    layers: &[LayerData],
    group: Group,
) -> Result<RankOutputs, String> {
    let rank = group.rank();
    let mut ep = Dispatcher::new(&group, config.clone())
        .map_err(|e| format!("rank {rank}: Dispatcher::new: {e}"))?;
    run_layers_on(&mut ep, sc, p, layers)
}

/// One rank's steps of a scenario on an existing dispatcher. Each step makes one valid call and
/// compares its result with the oracle: a library error is returned as `Err`, a mismatch is
/// recorded in `fails` (so that the rank keeps making the collective calls its peers expect).
pub struct Steps<'a> {
    pub sc: &'a Scenario,
    pub p: &'a Problem,
    pub rank: usize,
    pub fails: Vec<String>,
}

impl<'a> Steps<'a> {
    pub fn new(sc: &'a Scenario, p: &'a Problem, rank: usize) -> Steps<'a> {
        Steps {
            sc,
            p,
            rank,
            fails: Vec::new(),
        }
    }

    fn note(&mut self, what: String, r: Result<(), String>) {
        if let Err(e) = r {
            self.fails.push(format!("rank {}, {what}: {e}", self.rank));
        }
    }

    fn expert_major(&self) -> bool {
        !matches!(self.sc.layout, Layout::TokenMajor)
    }

    fn wdims(&self, rows: usize) -> Vec<usize> {
        if self.expert_major() {
            vec![rows]
        } else {
            vec![rows, self.sc.topk]
        }
    }

    /// Mismatches so far, as one error.
    pub fn finish(&self) -> Result<(), String> {
        if self.fails.is_empty() {
            Ok(())
        } else {
            Err(self.fails.join("\n"))
        }
    }

    /// The staged dispatch inputs of this rank in `layer`: (x, topk_idx, weights, scales).
    pub fn dispatch_inputs(
        &self,
        layer: &LayerData,
    ) -> (Staged, Staged, Option<Staged>, Option<Staged>) {
        let (sc, rank) = (self.sc, self.rank);
        let inp = &layer.inputs[rank];
        let (t, k, h) = (inp.num_tokens, sc.topk, sc.hidden);
        let x = Staged::new(&inp.x, &[t, h], self.p.dtype);
        let topk = if sc.topk_i64 {
            let v: Vec<i64> = inp.topk_idx.iter().map(|&e| e as i64).collect();
            Staged::i64(&v, &[t, k])
        } else {
            Staged::i32(&inp.topk_idx, &[t, k])
        };
        let w = inp.weights.as_ref().map(|w| Staged::f32(w, &[t, k]));
        let s = inp
            .scales
            .as_ref()
            .map(|s| Staged::f32(s, &[t, sc.scale_columns]));
        (x, topk, w, s)
    }

    /// Valid dispatch of `layer`, checked (payload, metadata, counts, output sizing).
    pub fn dispatch(
        &mut self,
        ep: &mut Dispatcher,
        l: usize,
        layer: &LayerData,
    ) -> Result<(DispatchOutput, Handle), String> {
        let rank = self.rank;
        let t = layer.inputs[rank].num_tokens;
        let (x, topk, w, s) = self.dispatch_inputs(layer);
        let (x, topk, w, s) = (
            put(ep, &x)?,
            put(ep, &topk)?,
            put_opt(ep, &w)?,
            put_opt(ep, &s)?,
        );
        let (out, handle) = ep
            .dispatch(
                x.view(),
                topk.view(),
                w.as_ref().map(Tensor::view),
                s.as_ref().map(Tensor::view),
            )
            .map_err(|e| format!("rank {rank}, layer {l}, dispatch: {e}"))?;
        settle(ep, &format!("rank {rank}, layer {l}, dispatch"))?;
        let out = host(out.to_host(), "dispatch output")?;
        let exp = &layer.dispatch[rank];
        self.note(
            format!("layer {l}, dispatch"),
            oracle::compare_dispatch(exp, &out),
        );
        let sizing = match self.sc.sizing {
            OutputSizing::Capacity => {
                if out.x.rows() != ep.recv_capacity() {
                    Err(format!(
                        "capacity sizing: expected {} rows (recv_capacity), got {}",
                        ep.recv_capacity(),
                        out.x.rows()
                    ))
                } else if out.host_counts.is_some() {
                    Err("capacity sizing: expected no host_counts, got some".into())
                } else {
                    Ok(())
                }
            }
            OutputSizing::Exact => match &out.host_counts {
                None => Err("exact sizing: expected host_counts, got none".into()),
                Some(_) if out.x.rows() != exp.rows => Err(format!(
                    "exact sizing: expected {} rows, got {}",
                    exp.rows,
                    out.x.rows()
                )),
                Some(_) => Ok(()),
            },
        };
        self.note(format!("layer {l}, dispatch output sizing"), sizing);
        if handle.num_tokens() != t {
            self.note(
                format!("layer {l}, handle"),
                Err(format!(
                    "num_tokens: expected {t}, got {}",
                    handle.num_tokens()
                )),
            );
        }
        Ok((out, handle))
    }

    /// The staged combine inputs of this rank: (y, weights).
    pub fn combine_inputs(&self, layer: &LayerData) -> (Staged, Option<Staged>) {
        let rank = self.rank;
        let y_rows = layer.y_rows[rank];
        let y = Staged::new(
            &layer.y[rank],
            &[y_rows, self.sc.hidden],
            self.p.combine_dtype,
        );
        let cw = layer.combine_weights.as_ref().map(|w| {
            Staged::new(
                bytemuck::cast_slice(&w[rank]),
                &self.wdims(y_rows),
                DType::F32,
            )
        });
        (y, cw)
    }

    /// Valid combine of `layer` along `handle`, checked.
    pub fn combine(
        &mut self,
        ep: &mut Dispatcher,
        l: usize,
        layer: &LayerData,
        handle: &Handle,
    ) -> Result<CombineOutput, String> {
        let rank = self.rank;
        let (t, k, h, cd) = (
            layer.inputs[rank].num_tokens,
            self.sc.topk,
            self.sc.hidden,
            self.p.combine_dtype,
        );
        let (y, cw) = self.combine_inputs(layer);
        let (y, cw) = (put(ep, &y)?, put_opt(ep, &cw)?);
        let c = ep
            .combine(handle, y.view(), cw.as_ref().map(Tensor::view))
            .map_err(|e| format!("rank {rank}, layer {l}, combine: {e}"))?;
        settle(ep, &format!("rank {rank}, layer {l}, combine"))?;
        let c = host(c.to_host(), "combine output")?;
        let ec = &layer.combine[rank];
        self.note(
            format!("layer {l}, combine"),
            check_tensor("x", &c.x, cd, &[t, h], &ec.x, None),
        );
        self.note(
            format!("layer {l}, combine"),
            opt_f32("weights", &ec.weights, &c.weights, &[t, k]),
        );
        Ok(c)
    }

    /// Valid cached dispatch of `layer`'s second payload along `handle`, checked: bit-identical to
    /// a dispatch of that payload.
    pub fn dispatch_cached(
        &mut self,
        ep: &mut Dispatcher,
        l: usize,
        layer: &LayerData,
        handle: &Handle,
    ) -> Result<CachedDispatchOutput, String> {
        let rank = self.rank;
        let (h, dt, sccols) = (self.sc.hidden, self.p.dtype, self.sc.scale_columns);
        let ci = &layer.cached_inputs[rank];
        let t = ci.num_tokens;
        let rows = layer.dispatch[rank].rows;
        let padding = &layer.dispatch[rank].padding;
        let x2 = put(ep, &Staged::new(&ci.x, &[t, h], dt))?;
        let s2 = put_opt(
            ep,
            &ci.scales.as_ref().map(|s| Staged::f32(s, &[t, sccols])),
        )?;
        let cached = ep
            .dispatch_cached(handle, x2.view(), s2.as_ref().map(Tensor::view))
            .map_err(|e| format!("rank {rank}, layer {l}, dispatch_cached: {e}"))?;
        settle(ep, &format!("rank {rank}, layer {l}, dispatch_cached"))?;
        let cached = host(cached.to_host(), "dispatch_cached output")?;
        let ecd = &layer.cached[rank];
        let r = (|| {
            check_leading_rows("x", &cached.x, dt, h, rows, padding, &ecd.x)?;
            match (&ecd.scales, &cached.scales) {
                (None, None) => Ok(()),
                (Some(e), Some(a)) => oracle::compare_rows(
                    "scales",
                    DType::F32,
                    sccols,
                    rows,
                    Some(padding),
                    bytemuck::cast_slice(e),
                    a.host_bytes(),
                ),
                (e, _) => Err(format!(
                    "scales: expected {}, got {}",
                    if e.is_some() { "a tensor" } else { "none" },
                    if e.is_some() { "none" } else { "a tensor" }
                )),
            }
        })();
        self.note(format!("layer {l}, dispatch_cached"), r);
        Ok(cached)
    }

    /// Cached dispatch of the original payload along `handle`: bit-identical to what the original
    /// dispatch returned (x and scales, valid non-padding rows).
    pub fn replay_original(
        &mut self,
        ep: &mut Dispatcher,
        l: usize,
        layer: &LayerData,
        handle: &Handle,
        original: &DispatchOutput,
    ) -> Result<(), String> {
        let rank = self.rank;
        let (x, _, _, s) = self.dispatch_inputs(layer);
        let (x, s) = (put(ep, &x)?, put_opt(ep, &s)?);
        let again = ep
            .dispatch_cached(handle, x.view(), s.as_ref().map(Tensor::view))
            .map_err(|e| format!("rank {rank}, layer {l}, dispatch_cached (replay): {e}"))?;
        settle(
            ep,
            &format!("rank {rank}, layer {l}, dispatch_cached (replay)"),
        )?;
        let again = host(again.to_host(), "dispatch_cached output")?;
        let (rows, padding) = (layer.dispatch[rank].rows, &layer.dispatch[rank].padding);
        let (h, dt) = (self.sc.hidden, self.p.dtype);
        let r = (|| {
            oracle::compare_rows(
                "x vs original dispatch",
                dt,
                h,
                rows,
                Some(padding),
                original.x.host_bytes(),
                again.x.host_bytes(),
            )?;
            match (&original.scales, &again.scales) {
                (Some(o), Some(a)) => oracle::compare_rows(
                    "scales vs original dispatch",
                    DType::F32,
                    self.sc.scale_columns,
                    rows,
                    Some(padding),
                    o.host_bytes(),
                    a.host_bytes(),
                ),
                (None, None) => Ok(()),
                _ => Err("scales: present in one of dispatch / replay only".into()),
            }
        })();
        self.note(format!("layer {l}, dispatch_cached replay"), r);
        Ok(())
    }

    /// Valid dispatch_backward of `layer`'s gradients along `handle`, checked.
    pub fn dispatch_backward(
        &mut self,
        ep: &mut Dispatcher,
        l: usize,
        layer: &LayerData,
        handle: &Handle,
    ) -> Result<DispatchBackwardOutput, String> {
        let rank = self.rank;
        let (t, k, h, cd) = (
            layer.inputs[rank].num_tokens,
            self.sc.topk,
            self.sc.hidden,
            self.p.combine_dtype,
        );
        let y_rows = layer.y_rows[rank];
        let g = Staged::new(&layer.grad_recv[rank], &[y_rows, h], cd);
        let gw = layer.grad_recv_weights.as_ref().map(|w| {
            Staged::new(
                bytemuck::cast_slice(&w[rank]),
                &self.wdims(y_rows),
                DType::F32,
            )
        });
        let (g, gw) = (put(ep, &g)?, put_opt(ep, &gw)?);
        let db = ep
            .dispatch_backward(handle, g.view(), gw.as_ref().map(Tensor::view))
            .map_err(|e| format!("rank {rank}, layer {l}, dispatch_backward: {e}"))?;
        settle(ep, &format!("rank {rank}, layer {l}, dispatch_backward"))?;
        let db = host(db.to_host(), "dispatch_backward output")?;
        let (egx, egw) = &layer.dispatch_backward[rank];
        self.note(
            format!("layer {l}, dispatch_backward"),
            check_tensor("grad_x", &db.grad_x, cd, &[t, h], egx, None),
        );
        self.note(
            format!("layer {l}, dispatch_backward"),
            opt_f32("grad_weights", egw, &db.grad_weights, &[t, k]),
        );
        Ok(db)
    }

    /// Valid combine_backward of `layer`'s grad_out along `handle` (with y when expert-major),
    /// checked.
    pub fn combine_backward(
        &mut self,
        ep: &mut Dispatcher,
        l: usize,
        layer: &LayerData,
        handle: &Handle,
    ) -> Result<CombineBackwardOutput, String> {
        let rank = self.rank;
        let (t, k, h, cd) = (
            layer.inputs[rank].num_tokens,
            self.sc.topk,
            self.sc.hidden,
            self.p.combine_dtype,
        );
        let rows = layer.dispatch[rank].rows;
        let padding = &layer.dispatch[rank].padding;
        let y_rows = layer.y_rows[rank];
        let go = Staged::new(&layer.grad_out[rank], &[t, h], cd);
        let yb = self
            .expert_major()
            .then(|| Staged::new(&layer.y[rank], &[y_rows, h], cd));
        let (go, yb) = (put(ep, &go)?, put_opt(ep, &yb)?);
        let cb = ep
            .combine_backward(handle, go.view(), yb.as_ref().map(Tensor::view))
            .map_err(|e| format!("rank {rank}, layer {l}, combine_backward: {e}"))?;
        settle(ep, &format!("rank {rank}, layer {l}, combine_backward"))?;
        let cb = host(cb.to_host(), "combine_backward output")?;
        let (egy, egw) = (
            &layer.combine_backward.0[rank],
            &layer.combine_backward.1[rank],
        );
        let r = (|| {
            check_leading_rows("grad_y", &cb.grad_y, cd, h, rows, padding, egy)?;
            opt_f32("grad_weights", egw, &cb.grad_weights, &[t, k])
        })();
        self.note(format!("layer {l}, combine_backward"), r);
        Ok(cb)
    }
}

/// Runs every layer of a scenario on this rank's dispatcher: all dispatches first (handles alive at
/// once), then per layer in reverse order combine, cached dispatch, dispatch_backward and
/// combine_backward, each checked against the oracle.
pub fn run_layers_on(
    ep: &mut Dispatcher,
    sc: &Scenario,
    p: &Problem,
    layers: &[LayerData],
) -> Result<RankOutputs, String> {
    let rank = ep.rank();
    let mut st = Steps::new(sc, p, rank);
    let (h, wcols) = (
        sc.hidden,
        if matches!(sc.layout, Layout::TokenMajor) {
            sc.topk
        } else {
            1
        },
    );
    let n = layers.len();
    let mut outs = RankOutputs {
        recv_x: vec![Vec::new(); n],
        recv_weights: vec![None; n],
        combine_x: vec![Vec::new(); n],
        grad_x: vec![Vec::new(); n],
        grad_weights: vec![None; n],
        grad_y: vec![Vec::new(); n],
        combine_grad_weights: vec![None; n],
    };
    let mut handles: Vec<Handle> = Vec::new();
    let mut originals: Vec<DispatchOutput> = Vec::new();
    for (l, layer) in layers.iter().enumerate() {
        let (out, handle) = st.dispatch(ep, l, layer)?;
        let rows = layer.dispatch[rank].rows;
        let xb = rows * h * p.dtype.size();
        let bytes = fetch(&out.x);
        outs.recv_x[l] = bytes[..xb.min(bytes.len())].to_vec();
        outs.recv_weights[l] = out.topk_weights.as_ref().map(|w| {
            let v = w.to_vec::<f32>().unwrap_or_default();
            v[..(rows * wcols).min(v.len())].to_vec()
        });
        originals.push(out);
        handles.push(handle);
    }
    for l in (0..n).rev() {
        let (layer, handle) = (&layers[l], &handles[l]);
        let c = st.combine(ep, l, layer, handle)?;
        outs.combine_x[l] = fetch(&c.x);
        st.dispatch_cached(ep, l, layer, handle)?;
        st.replay_original(ep, l, layer, handle, &originals[l])?;
        let db = st.dispatch_backward(ep, l, layer, handle)?;
        outs.grad_x[l] = fetch(&db.grad_x);
        outs.grad_weights[l] = db
            .grad_weights
            .as_ref()
            .and_then(|w| w.to_vec::<f32>().ok());
        let cb = st.combine_backward(ep, l, layer, handle)?;
        let gyb = layer.dispatch[rank].rows * h * p.combine_dtype.size();
        let bytes = fetch(&cb.grad_y);
        outs.grad_y[l] = bytes[..gyb.min(bytes.len())].to_vec();
        outs.combine_grad_weights[l] = cb
            .grad_weights
            .as_ref()
            .and_then(|w| w.to_vec::<f32>().ok());
    }
    st.finish().map(|()| outs)
}

/// Runs a scenario and discards the outputs.
pub fn check(backend: &dyn BackendUnderTest, sc: &Scenario) -> Result<(), String> {
    run_scenario(backend, sc).map(|_| ())
}

/// Runs the scenario once per layout (token-major, expert-major align 1 and 4).
fn check_layouts(
    backend: &dyn BackendUnderTest,
    make: impl Fn(Layout) -> Scenario,
) -> Result<(), String> {
    let mut errs = Vec::new();
    for layout in [
        Layout::TokenMajor,
        Layout::ExpertMajor { align: 1 },
        Layout::ExpertMajor { align: 4 },
    ] {
        let mut sc = make(layout);
        sc.name = format!("{} ({layout:?})", sc.name);
        if let Err(e) = check(backend, &sc) {
            errs.push(e);
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

fn all(results: Vec<Result<(), String>>) -> Result<(), String> {
    let errs: Vec<String> = results.into_iter().filter_map(|r| r.err()).collect();
    if errs.is_empty() {
        Ok(())
    } else {
        Err(errs.join("\n"))
    }
}

// ---------------------------------------------------------------------------------------------
// Cases

const TM: Layout = Layout::TokenMajor;

pub fn token_major_basic(b: &dyn BackendUnderTest) -> Result<(), String> {
    check(b, &Scenario::new("token_major_basic", TM))
}

pub fn expert_major_align1(b: &dyn BackendUnderTest) -> Result<(), String> {
    check(
        b,
        &Scenario::new("expert_major_align1", Layout::ExpertMajor { align: 1 }),
    )
}

pub fn expert_major_align4(b: &dyn BackendUnderTest) -> Result<(), String> {
    check(
        b,
        &Scenario::new("expert_major_align4", Layout::ExpertMajor { align: 4 }),
    )
}

pub fn topk_1(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        topk: 1,
        ..Scenario::new("topk_1", l)
    })
}

pub fn topk_8(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        topk: 8,
        num_experts: 16,
        world: 4,
        ..Scenario::new("topk_8", l)
    })
}

pub fn zero_tokens_all_ranks(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        tokens: Some(vec![0, 0, 0]),
        world: 3,
        num_experts: 6,
        ..Scenario::new("zero_tokens_all_ranks", l)
    })
}

pub fn tokens_differ_across_ranks(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        tokens: Some(vec![0, 3, 8, 1]),
        world: 4,
        num_experts: 8,
        ..Scenario::new("tokens_differ_across_ranks", l)
    })
}

pub fn tokens_at_max(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        tokens: Some(vec![8, 8]),
        max_tokens: 8,
        ..Scenario::new("tokens_at_max", l)
    })
}

pub fn dropped_slot_patterns(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        topk: 8,
        num_experts: 8,
        world: 2,
        max_tokens: 13,
        tokens: Some(vec![13, 12]),
        routing: Routing::DropPatterns,
        ..Scenario::new("dropped_slot_patterns", l)
    })
}

pub fn all_slots_dropped(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        routing: Routing::Random {
            drop: 1.0,
            distinct: false,
        },
        ..Scenario::new("all_slots_dropped", l)
    })
}

pub fn duplicate_expert_ids(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        topk: 6,
        routing: Routing::Duplicates,
        combine_weights: true,
        ..Scenario::new("duplicate_expert_ids", l)
    })
}

pub fn weights_and_scales(b: &dyn BackendUnderTest) -> Result<(), String> {
    let mut r = Vec::new();
    for (weights, scales) in [(false, 0), (true, 0), (false, 3), (true, 2)] {
        r.push(check_layouts(b, |l| Scenario {
            weights,
            scale_columns: scales,
            seed: 7 + scales as u64,
            ..Scenario::new(&format!("weights={weights} scales={scales}"), l)
        }));
    }
    all(r)
}

pub fn combine_weights_given(b: &dyn BackendUnderTest) -> Result<(), String> {
    let mut r = Vec::new();
    for weights in [false, true] {
        r.push(check_layouts(b, |l| Scenario {
            weights,
            combine_weights: true,
            extra_rows: true,
            ..Scenario::new(
                &format!("combine_weights_given dispatch_weights={weights}"),
                l,
            )
        }));
    }
    all(r)
}

fn dtype_case(
    b: &dyn BackendUnderTest,
    dtype: DType,
    combine: Option<DType>,
) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        dtype,
        combine_dtype: combine,
        scale_columns: if dtype == DType::Fp8E4M3 { 2 } else { 0 },
        ..Scenario::new(&format!("dtype {dtype} combine {combine:?}"), l)
    })
}

pub fn dtype_bf16(b: &dyn BackendUnderTest) -> Result<(), String> {
    dtype_case(b, DType::BF16, None)
}

pub fn dtype_f16(b: &dyn BackendUnderTest) -> Result<(), String> {
    dtype_case(b, DType::F16, None)
}

pub fn dtype_f32(b: &dyn BackendUnderTest) -> Result<(), String> {
    dtype_case(b, DType::F32, None)
}

pub fn dtype_fp8(b: &dyn BackendUnderTest) -> Result<(), String> {
    all(vec![
        dtype_case(b, DType::Fp8E4M3, None),
        dtype_case(b, DType::Fp8E4M3, Some(DType::F16)),
    ])
}

pub fn dtype_bf16_combine_f32(b: &dyn BackendUnderTest) -> Result<(), String> {
    dtype_case(b, DType::BF16, Some(DType::F32))
}

pub fn topk_idx_i64(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        topk_i64: true,
        ..Scenario::new("topk_idx_i64", l)
    })
}

pub fn placement_table(b: &dyn BackendUnderTest) -> Result<(), String> {
    // Rank 2 owns no expert; rank 1 owns most; ids interleave across ranks.
    check_layouts(b, |l| Scenario {
        world: 4,
        num_experts: 8,
        placement: Some(vec![1, 0, 1, 1, 3, 0, 1, 3]),
        ..Scenario::new("placement_table", l)
    })
}

pub fn cached_dispatch(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        world: 3,
        num_experts: 9,
        scale_columns: 2,
        dtype: DType::Fp8E4M3,
        ..Scenario::new("cached_dispatch", l)
    })
}

pub fn handles_alive_reverse_order(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        layers: 3,
        scale_columns: 1,
        ..Scenario::new("handles_alive_reverse_order", l)
    })
}

pub fn output_sizing_exact(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        sizing: OutputSizing::Exact,
        scale_columns: 2,
        tokens: Some(vec![5, 0, 8]),
        world: 3,
        num_experts: 6,
        ..Scenario::new("output_sizing_exact", l)
    })
}

pub fn extra_rows_handed_back(b: &dyn BackendUnderTest) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        extra_rows: true,
        ..Scenario::new("extra_rows_handed_back", l)
    })
}

pub fn f32_summation_order(b: &dyn BackendUnderTest) -> Result<(), String> {
    // f32 data over 4 ranks and 8 slots: sums of three or more terms, where the order shows.
    check_layouts(b, |l| Scenario {
        world: 4,
        num_experts: 8,
        topk: 8,
        dtype: DType::F32,
        combine_weights: true,
        routing: Routing::Random {
            drop: 0.05,
            distinct: false,
        },
        ..Scenario::new("f32_summation_order", l)
    })
}

pub fn signed_zeros(b: &dyn BackendUnderTest) -> Result<(), String> {
    // -0.0 inputs: every sum starts at +0.0, so a lone -0.0 contribution comes back as +0.0.
    let mut r = Vec::new();
    for dtype in [DType::BF16, DType::F32] {
        r.push(check_layouts(b, |l| Scenario {
            world: 3,
            num_experts: 6,
            dtype,
            values: Values::SignedZeros,
            combine_weights: true,
            ..Scenario::new(&format!("signed_zeros {dtype}"), l)
        }));
    }
    all(r)
}

pub fn hidden_wide(b: &dyn BackendUnderTest) -> Result<(), String> {
    // H = 80: more than one 32-lane stride per lane in the weight-gradient dot product.
    check_layouts(b, |l| Scenario {
        hidden: 80,
        max_tokens: 5,
        combine_weights: true,
        ..Scenario::new("hidden_wide", l)
    })
}

fn world_case(b: &dyn BackendUnderTest, world: usize) -> Result<(), String> {
    check_layouts(b, |l| Scenario {
        world,
        num_experts: 2 * world,
        max_tokens: 6,
        hidden: 8,
        ..Scenario::new(&format!("world_{world}"), l)
    })
}

pub fn world_1(b: &dyn BackendUnderTest) -> Result<(), String> {
    world_case(b, 1)
}

pub fn world_2(b: &dyn BackendUnderTest) -> Result<(), String> {
    world_case(b, 2)
}

pub fn world_4(b: &dyn BackendUnderTest) -> Result<(), String> {
    world_case(b, 4)
}

pub fn world_8(b: &dyn BackendUnderTest) -> Result<(), String> {
    world_case(b, 8)
}

fn dot_rows(dtype: DType, h: usize, a: &[u8], b: &[u8], rows: usize, skip: Option<&[bool]>) -> f64 {
    let mut acc = 0f64;
    for r in 0..rows {
        if skip.is_some_and(|s| s[r]) {
            continue;
        }
        for c in 0..h {
            acc += oracle::widen(dtype, a, r * h + c) as f64
                * oracle::widen(dtype, b, r * h + c) as f64;
        }
    }
    acc
}

fn transpose_identities(b: &dyn BackendUnderTest, layout: Layout) -> Result<(), String> {
    let sc = Scenario {
        world: 4,
        num_experts: 8,
        topk: 3,
        dtype: DType::F32,
        values: Values::SmallInt,
        layers: 2,
        routing: Routing::Random {
            drop: 0.2,
            distinct: false,
        },
        ..Scenario::new(&format!("transpose_identity ({layout:?})"), layout)
    };
    let (layers, outs) = run_scenario(b, &sc)?;
    let (h, k) = (sc.hidden, sc.topk);
    let f = DType::F32;
    let expert_major = !matches!(layout, Layout::TokenMajor);
    let wcols = if expert_major { 1 } else { k };
    for (l, layer) in layers.iter().enumerate() {
        // <dispatch(x), g> = <x, dispatch_backward(g)>
        let mut lhs = 0f64;
        let mut rhs = 0f64;
        let mut wl = 0f64;
        let mut wr = 0f64;
        for r in 0..sc.world {
            let e = &layer.dispatch[r];
            lhs += dot_rows(
                f,
                h,
                &outs[r].recv_x[l],
                &layer.grad_recv[r],
                e.rows,
                Some(&e.padding),
            );
            let inp = &layer.inputs[r];
            rhs += dot_rows(f, h, &inp.x, &outs[r].grad_x[l], inp.num_tokens, None);
            // the same for the weights
            if let (Some(rw), Some(g)) = (&outs[r].recv_weights[l], &layer.grad_recv_weights) {
                for i in 0..e.rows * wcols {
                    if !e.padding[i / wcols] {
                        wl += rw[i] as f64 * g[r][i] as f64;
                    }
                }
            }
            if let (Some(w), Some(gw)) = (&inp.weights, &outs[r].grad_weights[l]) {
                wr += w
                    .iter()
                    .zip(gw)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>();
            }
        }
        if lhs != rhs {
            return Err(format!(
                "[{}] layer {l}: <dispatch(x), g> = {lhs} but <x, dispatch_backward(g)> = {rhs}",
                sc.name
            ));
        }
        if wl != wr {
            return Err(format!(
                "[{}] layer {l}: <dispatch(w), gw> = {wl} but <w, dispatch_backward(gw)> = {wr}",
                sc.name
            ));
        }
        // <combine(y), g> = <y, combine_backward(g)> (combine weighted by the dispatch weights)
        let mut cl = 0f64;
        let mut cr = 0f64;
        for (r, out) in outs.iter().enumerate() {
            let inp = &layer.inputs[r];
            cl += dot_rows(
                f,
                h,
                &out.combine_x[l],
                &layer.grad_out[r],
                inp.num_tokens,
                None,
            );
            let e = &layer.dispatch[r];
            cr += dot_rows(f, h, &layer.y[r], &out.grad_y[l], e.rows, Some(&e.padding));
        }
        if cl != cr {
            return Err(format!(
                "[{}] layer {l}: <combine(y), g> = {cl} but <y, combine_backward(g)> = {cr}",
                sc.name
            ));
        }
    }
    Ok(())
}

pub fn transpose_identity_token_major(b: &dyn BackendUnderTest) -> Result<(), String> {
    transpose_identities(b, TM)
}

pub fn transpose_identity_expert_major(b: &dyn BackendUnderTest) -> Result<(), String> {
    all(vec![
        transpose_identities(b, Layout::ExpertMajor { align: 1 }),
        transpose_identities(b, Layout::ExpertMajor { align: 4 }),
    ])
}

/// Every case with its name.
pub type Case = (
    &'static str,
    fn(&dyn BackendUnderTest) -> Result<(), String>,
);

crate::__conformance_case_list!(array);
