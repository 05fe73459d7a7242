//! The edge to the benchmark baselines' kernels (crates/moe-ep-kernels/cuda/baseline.cu, compiled
//! into the same embedded fatbin as the library's kernels and loaded here as a module of its own):
//! one launch function per kernel whose argument list mirrors the kernel's signature. Buffer sizes
//! are the callers' (`crate::baseline`) duty, as each kernel's comment in baseline.cu states them;
//! these functions are crate-internal for that reason.

use super::cuda_memory::{describe, load_kernels};
use super::cuda_stream::Stream;
use cudarc::driver::{result, CudaContext, CudaFunction, CudaModule};
use std::ffi::c_void;
use std::sync::Arc;

/// Slots per chunk of the counting sort: one block counts a chunk, one warp places it.
pub(crate) const CHUNK_SLOTS: usize = 2048;
/// Threads of the counting and scanning blocks.
const SORT_THREADS: u32 = 256;
/// Threads of the copying and reducing blocks (a warp per row or token).
const ROW_THREADS: u32 = 256;
/// Dynamic shared memory a block may take without opting in (the sort keeps one int per bucket).
pub(crate) const MAX_SHARED_BYTES: usize = 48 * 1024;

/// One kernel argument, stored by value until the launch copies it.
enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
}

impl Arg {
    fn param(&mut self) -> *mut c_void {
        match self {
            Arg::Ptr(v) => v as *mut u64 as *mut c_void,
            Arg::I32(v) => v as *mut i32 as *mut c_void,
            Arg::I64(v) => v as *mut i64 as *mut c_void,
        }
    }
}

/// The element type the weighted sum is instantiated for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SumType {
    Bf16,
    F16,
    F32,
}

/// The baselines' kernels, loaded on one device.
pub(crate) struct BaselineKernels {
    _module: Arc<CudaModule>,
    count: CudaFunction,
    scan: CudaFunction,
    place: CudaFunction,
    permute: CudaFunction,
    /// bf16, f16, f32.
    weighted_sum: [CudaFunction; 3],
}

const NAMES: [&str; 7] = [
    "ep_baseline_bucket_count",
    "ep_baseline_bucket_scan",
    "ep_baseline_bucket_place",
    "ep_baseline_permute",
    "ep_baseline_weighted_sum_bf16",
    "ep_baseline_weighted_sum_f16",
    "ep_baseline_weighted_sum_f32",
];

fn i32_arg(v: usize, what: &str) -> Result<Arg, String> {
    i32::try_from(v)
        .map(Arg::I32)
        .map_err(|_| format!("{what} = {v} does not fit the kernels' 32-bit counts"))
}

fn i64_arg(v: usize) -> Arg {
    Arg::I64(v as i64)
}

fn launch(
    stream: &Stream,
    f: &CudaFunction,
    blocks: u32,
    threads: u32,
    shared_bytes: usize,
    mut args: Vec<Arg>,
    name: &str,
) -> Result<(), String> {
    if blocks == 0 {
        return Ok(());
    }
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| describe("binding the context", e))?;
    let mut params: Vec<*mut c_void> = args.iter_mut().map(Arg::param).collect();
    // SAFETY: every caller below passes exactly the kernel's parameters, in order and with the
    // kernel's types (device addresses as u64, `int` as i32, `long long` as i64), and addresses of
    // buffers sized as the kernel's comment states that stay alive until the stream has run the
    // kernel (owned by the baseline's call or borrowed from the caller for it). `args` outlives
    // the call, which copies the parameters; `shared_bytes` is at most MAX_SHARED_BYTES.
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            (blocks, 1, 1),
            (threads, 1, 1),
            shared_bytes as u32,
            stream.raw(),
            &mut params,
        )
    }
    .map_err(|e| describe(&format!("launching {name}"), e))
}

/// Blocks for `items` warps of work (one warp per row or token), capped: the kernels stride.
fn row_blocks(items: usize) -> u32 {
    let warps_per_block = (ROW_THREADS / 32) as usize;
    items.div_ceil(warps_per_block).clamp(1, 4096) as u32
}

/// Chunks of the counting sort over `num_slots` slots.
pub(crate) fn num_chunks(num_slots: usize) -> usize {
    num_slots.div_ceil(CHUNK_SLOTS)
}

impl BaselineKernels {
    pub(crate) fn load(ctx: &Arc<CudaContext>, fatbin: &[u8]) -> Result<Self, String> {
        let (module, f) = load_kernels(ctx, fatbin, &NAMES)?;
        let mut f = f.into_iter();
        let mut next = || f.next().expect("one function per name");
        Ok(BaselineKernels {
            count: next(),
            scan: next(),
            place: next(),
            permute: next(),
            weighted_sum: [next(), next(), next()],
            _module: module,
        })
    }

    /// The stable counting sort of `num_slots` slots of `idx` (i32) into buckets: for each slot its
    /// row, or -1 (`slot_row`, i32 `[num_slots]`); each bucket's first row (`bucket_start`, i32
    /// `[num_buckets + 1]`, the total last); the rows of each group of buckets (`group_rows`, i32
    /// `[num_groups]`, groups given by `group_start`, i32 `[num_groups + 1]`). `chunk_counts` is
    /// scratch of i32 `[num_chunks(num_slots)][num_buckets]`; `bucket_of_expert` is i32
    /// `[num_experts]` with values in `[-1, num_buckets)`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn bucket_sort(
        &self,
        s: &Stream,
        idx: u64,
        num_slots: usize,
        bucket_of_expert: u64,
        num_experts: usize,
        num_buckets: usize,
        group_start: u64,
        num_groups: usize,
        chunk_counts: u64,
        bucket_start: u64,
        group_rows: u64,
        slot_row: u64,
    ) -> Result<(), String> {
        let shared = num_buckets * 4;
        if shared > MAX_SHARED_BYTES {
            return Err(format!(
                "{num_buckets} buckets need {shared} bytes of shared memory, more than {MAX_SHARED_BYTES}"
            ));
        }
        let chunks = num_chunks(num_slots);
        let blocks = u32::try_from(chunks).map_err(|_| format!("{chunks} chunks"))?;
        let chunk = i32_arg(CHUNK_SLOTS, "chunk slots")?;
        launch(
            s,
            &self.count,
            blocks,
            SORT_THREADS,
            shared,
            vec![
                Arg::Ptr(idx),
                i64_arg(num_slots),
                Arg::Ptr(bucket_of_expert),
                i32_arg(num_experts, "num_experts")?,
                i32_arg(num_buckets, "buckets")?,
                i32_arg(CHUNK_SLOTS, "chunk slots")?,
                Arg::Ptr(chunk_counts),
            ],
            "ep_baseline_bucket_count",
        )?;
        launch(
            s,
            &self.scan,
            1,
            1024,
            0,
            vec![
                Arg::Ptr(chunk_counts),
                i32_arg(chunks, "chunks")?,
                i32_arg(num_buckets, "buckets")?,
                Arg::Ptr(group_start),
                i32_arg(num_groups, "groups")?,
                Arg::Ptr(bucket_start),
                Arg::Ptr(group_rows),
            ],
            "ep_baseline_bucket_scan",
        )?;
        launch(
            s,
            &self.place,
            blocks,
            32,
            shared,
            vec![
                Arg::Ptr(idx),
                i64_arg(num_slots),
                Arg::Ptr(bucket_of_expert),
                i32_arg(num_experts, "num_experts")?,
                i32_arg(num_buckets, "buckets")?,
                chunk,
                Arg::Ptr(chunk_counts),
                Arg::Ptr(slot_row),
            ],
            "ep_baseline_bucket_place",
        )
    }

    /// `dst[slot_row[i]] = src[i / topk]` (rows of `row_bytes` bytes) for every slot with a row.
    /// `src` holds `num_slots / topk` rows, `dst` as many rows as the largest `slot_row` + 1.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn permute(
        &self,
        s: &Stream,
        src: u64,
        row_bytes: usize,
        slot_row: u64,
        num_slots: usize,
        topk: usize,
        dst: u64,
    ) -> Result<(), String> {
        launch(
            s,
            &self.permute,
            row_blocks(num_slots),
            ROW_THREADS,
            0,
            vec![
                Arg::Ptr(src),
                i64_arg(row_bytes),
                Arg::Ptr(slot_row),
                i64_arg(num_slots),
                i32_arg(topk, "topk")?,
                Arg::Ptr(dst),
            ],
            "ep_baseline_permute",
        )
    }

    /// `out[t] = sum over k ascending of weights[t, k] * rows[slot_row[t, k]]` (slots with a row),
    /// f32 fmaf from +0.0, one rounding. `rows`: as many rows of `hidden` elements as the largest
    /// `slot_row` + 1; `slot_row` and `weights` (f32): `[num_tokens, topk]`; `out`: `[num_tokens,
    /// hidden]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn weighted_sum(
        &self,
        s: &Stream,
        elem: SumType,
        rows: u64,
        slot_row: u64,
        weights: u64,
        num_tokens: usize,
        topk: usize,
        hidden: usize,
        out: u64,
    ) -> Result<(), String> {
        let (f, name) = match elem {
            SumType::Bf16 => (&self.weighted_sum[0], NAMES[4]),
            SumType::F16 => (&self.weighted_sum[1], NAMES[5]),
            SumType::F32 => (&self.weighted_sum[2], NAMES[6]),
        };
        launch(
            s,
            f,
            row_blocks(num_tokens),
            ROW_THREADS,
            0,
            vec![
                Arg::Ptr(rows),
                Arg::Ptr(slot_row),
                Arg::Ptr(weights),
                i32_arg(num_tokens, "tokens")?,
                i32_arg(topk, "topk")?,
                i32_arg(hidden, "hidden")?,
                Arg::Ptr(out),
            ],
            name,
        )
    }
}
