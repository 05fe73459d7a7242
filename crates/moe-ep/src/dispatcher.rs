//! [`Dispatcher`]: the public entry point. It validates every argument, then hands the call to the
//! group's backend; a timeout or a collective mismatch poisons it.

use crate::backend::{self, Backend, DispatchArgs};
use crate::config::{EpConfig, Layout};
use crate::dtype::DType;
use crate::error::{EpError, Result};
use crate::group::{Group, GroupKind};
use crate::handle::{Handle, HandleInner};
use crate::output::{
    CachedDispatchOutput, CombineBackwardOutput, CombineOutput, DispatchBackwardOutput,
    DispatchOutput,
};
use crate::placement::Placement;
use crate::tensor::TensorRef;
use crate::validate;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

static NEXT_DISPATCHER_ID: AtomicU64 = AtomicU64::new(1);

/// Dispatch and combine for one rank of a group. Every call is collective: each rank of the group
/// makes the same sequence of calls on its dispatcher.
pub struct Dispatcher {
    id: u64,
    rank: usize,
    world: usize,
    config: EpConfig,
    placement: Arc<Placement>,
    backend: Box<dyn Backend>,
    poisoned: Option<EpError>,
}

impl Dispatcher {
    /// Builds this rank's dispatcher. Collective: every rank of `group` must call it with the same
    /// config (checked; a difference is an error naming the peer).
    pub fn new(group: &Group, config: EpConfig) -> Result<Self> {
        let placement = Arc::new(Placement::new(
            &config.placement,
            config.num_experts,
            group.world(),
        )?);
        let backend: Box<dyn Backend> = match &group.kind {
            GroupKind::Cpu(exchange) => Box::new(backend::cpu::CpuBackend::new(
                exchange.clone(),
                group.rank(),
                group.take_channel(),
                config.clone(),
                placement.clone(),
            )?),
            GroupKind::Cuda { control, device } => Box::new(backend::cuda::CudaBackend::new(
                control.clone(),
                group.rank(),
                group.take_channel(),
                device.clone(),
                config.clone(),
                placement.clone(),
            )?),
        };
        Ok(Dispatcher {
            id: NEXT_DISPATCHER_ID.fetch_add(1, Ordering::Relaxed),
            rank: group.rank(),
            world: group.world(),
            config,
            placement,
            backend,
            poisoned: None,
        })
    }

    /// A process-unique id; handles remember the dispatcher that made them.
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world(&self) -> usize {
        self.world
    }
    pub fn config(&self) -> &EpConfig {
        &self.config
    }
    pub fn placement(&self) -> &Placement {
        &self.placement
    }
    /// E_local of this rank.
    pub fn num_local_experts(&self) -> usize {
        self.placement.num_local(self.rank)
    }
    /// Rows of a capacity-sized dispatch output on this rank.
    pub fn recv_capacity(&self) -> usize {
        self.config.recv_capacity.unwrap_or_else(|| {
            self.config
                .worst_case_rows(self.world, self.num_local_experts())
        })
    }
    /// Where this dispatcher takes its inputs and puts its outputs.
    pub fn device(&self) -> crate::tensor::Device {
        self.backend.device()
    }

    /// Runs this dispatcher's later calls on the caller's stream (e.g. PyTorch's current stream,
    /// `torch.cuda.current_stream().cuda_stream`), with their allocations and frees, so they are
    /// ordered with the caller's own work on it. Waits for the work queued on the previous stream.
    ///
    /// Ranks of one process sharing a GPU: make every stream passed here before any rank of that
    /// GPU starts a call ([`crate::Group::device`] names the GPU before the dispatcher exists). A
    /// stream created while another rank's kernel waits inside the GPU may be queued behind that
    /// kernel, and both ranks then time out (docs/semantics.md, "Ranks sharing a GPU").
    ///
    /// # Safety
    /// `stream` must be a `CUstream` of this dispatcher's GPU (its primary context, which the
    /// frameworks use), and stay valid as long as this dispatcher, its handles and every tensor it
    /// returns from now on live (their memory is freed on it).
    pub unsafe fn set_cuda_stream(&mut self, stream: u64) -> Result<()> {
        self.check_usable()?;
        // SAFETY: the caller's contract above.
        self.run(|b| unsafe { b.set_cuda_stream(stream) })
    }

    /// Every rank's `bytes`, indexed by rank: a collective on the host, through the group's control
    /// plane (shared memory for ranks in one process, TCP for processes). For coordinating host
    /// work (barriers, gathering results), not for data: it never touches a device.
    pub fn all_gather_host(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>> {
        self.check_usable()?;
        self.run(|b| b.all_gather_host(bytes))
    }

    /// Waits until every rank of the group made this call, in the order of this rank's other
    /// calls (every rank makes it at the same point of its sequence). On the CUDA backend this is
    /// a kernel on the dispatcher's stream, and the host does not wait: work queued after it
    /// starts on every GPU within about a microsecond of the others, whenever each host got there.
    /// On the CPU backend, the host rendezvous.
    pub fn barrier(&mut self) -> Result<()> {
        self.check_usable()?;
        self.run(|b| b.barrier())
    }

    /// Holds this dispatcher's stream until the returned gate opens (or drops): work queued
    /// meanwhile then starts as soon as the device reaches it, not as the host queues it, as in a
    /// model whose host runs ahead of its GPU (see [`Dispatcher::timer_held`]). `None` on the
    /// CPU backend, where calls run on the host, and while recording a graph. Whatever waits for
    /// the stream on the host must come after the gate opens: [`Dispatcher::synchronize`] (and so
    /// a call with exact-sized outputs) opens it itself; a read of an output to the host does not,
    /// nor does a call that synchronizes the whole device (`cuMemFree`, some library setups such
    /// as NCCL's). The device stops waiting after the config's timeout, so a gate never opened
    /// delays the stream by that much; it does not hang it. A benchmarking aid.
    pub fn hold_stream(&mut self) -> Result<Option<crate::StreamGate>> {
        self.check_usable()?;
        self.run(|b| b.hold_stream())
    }

    /// The raw `CUstream` this dispatcher's calls run on (CUDA backend; `None` on the CPU). Calls
    /// are asynchronous on it: order work that produces inputs or consumes outputs against it
    /// (enqueue it on this stream, e.g. as `torch.cuda.ExternalStream`, or with events).
    pub fn cuda_stream(&self) -> Option<u64> {
        self.backend.cuda_stream()
    }

    /// A copy of host data where this dispatcher takes its inputs (the CPU backend: a host copy).
    pub fn to_device(&self, host: TensorRef<'_>) -> Result<crate::tensor::Tensor> {
        validate::device("tensor", &host, crate::tensor::Device::Host)?;
        self.backend.to_device(host)
    }

    /// Waits for this rank's queued work and reports any error the device found since the last
    /// synchronization (a bad expert id, a capacity overflow, a peer that did not arrive). Calls
    /// made with capacity-sized outputs return before the device has run them; this is where
    /// their errors surface.
    pub fn synchronize(&mut self) -> Result<()> {
        self.check_usable()?;
        self.run(|b| b.synchronize())
    }

    /// Records the calls `record` makes on this dispatcher into a CUDA graph instead of running
    /// them, and returns the graph to replay. Every rank records the same calls. The recorded calls
    /// must not need the host: capacity-sized outputs, no `synchronize`, no reads to the host.
    /// Outputs made inside are valid only inside: copy what must outlive a replay into tensors
    /// made beforehand ([`crate::Tensor::copy_from`]), and let the rest drop inside `record`.
    /// Inputs likewise live in tensors made beforehand; write new data into them between replays.
    pub fn capture_graph(
        &mut self,
        record: impl FnOnce(&mut Dispatcher) -> Result<()>,
    ) -> Result<crate::graph::Graph> {
        self.check_usable()?;
        self.backend.begin_capture()?;
        let recorded = record(self);
        let graph = self.backend.end_capture();
        recorded?;
        graph
    }

    /// The error that poisoned this dispatcher, if any.
    pub fn poisoned(&self) -> Option<&EpError> {
        self.poisoned.as_ref()
    }

    /// Sends each token `x[t]` (with `scales[t]`) once to every rank owning one of its experts.
    ///
    /// - `x`: `[T, H]` of the config's dtype, `T <= max_tokens_per_rank`;
    /// - `topk_idx`: `[T, K]` i32 or i64, each an expert id or -1 (dropped slot);
    /// - `weights`: optional `[T, K]` f32; `scales`: `[T, S]` f32 exactly when S > 0.
    pub fn dispatch(
        &mut self,
        x: TensorRef<'_>,
        topk_idx: TensorRef<'_>,
        weights: Option<TensorRef<'_>>,
        scales: Option<TensorRef<'_>>,
    ) -> Result<(DispatchOutput, Handle)> {
        self.check_usable()?;
        let dev = self.backend.device();
        let (k, h) = (self.config.topk, self.config.hidden);
        validate::device("x", &x, dev)?;
        validate::dtype("x", &x, self.config.dtype)?;
        let t = validate::matrix("x", &x, h, "T")?;
        if t > self.config.max_tokens_per_rank {
            return Err(EpError::TooManyTokens {
                arg: "x",
                max: self.config.max_tokens_per_rank,
                actual: t,
            });
        }
        self.check_topk_shape("topk_idx", &topk_idx, t)?;
        validate::device("topk_idx", &topk_idx, dev)?;
        if !matches!(topk_idx.dtype(), DType::I32 | DType::I64) {
            return Err(EpError::DType {
                arg: "topk_idx",
                expected: "i32 or i64".into(),
                actual: topk_idx.dtype().to_string(),
            });
        }
        if let Some(w) = &weights {
            validate::device("topk_weights", w, dev)?;
            validate::dtype("topk_weights", w, DType::F32)?;
            self.check_topk_shape("topk_weights", w, t)?;
        }
        self.check_scales(scales.as_ref(), t)?;
        let topk_host = match topk_idx.device() {
            crate::tensor::Device::Host => Some(validate::read_topk_host(
                &topk_idx,
                k,
                self.config.num_experts,
            )?),
            crate::tensor::Device::Cuda(_) => None,
        };
        let has_weights = weights.is_some();
        let done = self.run(|b| {
            b.dispatch(DispatchArgs {
                x,
                topk_idx,
                topk_host,
                weights,
                scales,
            })
        })?;
        let handle = Handle {
            inner: Arc::new(HandleInner {
                dispatcher_id: self.id,
                layout: self.config.layout,
                num_tokens: t,
                num_rows: done.num_rows,
                out_rows: done.out_rows,
                has_weights,
                state: done.state,
            }),
        };
        Ok((done.output, handle))
    }

    /// Sends a new payload along the routing recorded in `handle`, without recomputing it: the rows
    /// land exactly where the recorded dispatch put them.
    pub fn dispatch_cached(
        &mut self,
        handle: &Handle,
        x: TensorRef<'_>,
        scales: Option<TensorRef<'_>>,
    ) -> Result<CachedDispatchOutput> {
        self.check_usable()?;
        let h = self.check_handle(handle)?;
        let dev = self.backend.device();
        validate::device("x", &x, dev)?;
        validate::dtype("x", &x, self.config.dtype)?;
        let t = validate::matrix("x", &x, self.config.hidden, "T")?;
        if t != h.num_tokens {
            return Err(EpError::CachedTokenCount {
                arg: "x",
                expected: h.num_tokens,
                actual: t,
            });
        }
        self.check_scales(scales.as_ref(), t)?;
        self.run(|b| b.dispatch_cached(h, x, scales))
    }

    /// Brings expert outputs back to their source ranks and reduces them per token.
    ///
    /// `y` holds the dispatch output's rows (at least the valid rows), `[rows, H]` of the combine
    /// dtype. Token-major: unweighted sum; the optional `weights [rows, K]` f32 are summed the same
    /// way into the output's `weights`. Expert-major: weighted by `weights [rows]` f32 when given,
    /// else by the weights recorded at dispatch (1 when dispatch had none).
    pub fn combine(
        &mut self,
        handle: &Handle,
        y: TensorRef<'_>,
        weights: Option<TensorRef<'_>>,
    ) -> Result<CombineOutput> {
        self.check_usable()?;
        let h = self.check_handle(handle)?;
        self.check_rows_back("y", &y, h)?;
        if let Some(w) = &weights {
            self.check_row_weights("weights", w, h)?;
        }
        self.run(|b| b.combine(h, y, weights))
    }

    /// The transpose of dispatch: per token, the sum of the gradients of all its copies (weights
    /// taken as 1), and with `grad_recv_weights` (shaped like dispatch's `topk_weights` output) the
    /// gradient of the weights.
    pub fn dispatch_backward(
        &mut self,
        handle: &Handle,
        grad_recv: TensorRef<'_>,
        grad_recv_weights: Option<TensorRef<'_>>,
    ) -> Result<DispatchBackwardOutput> {
        self.check_usable()?;
        let h = self.check_handle(handle)?;
        self.check_rows_back("grad_recv", &grad_recv, h)?;
        if let Some(w) = &grad_recv_weights {
            self.check_row_weights("grad_recv_weights", w, h)?;
        }
        self.run(|b| b.dispatch_backward(h, grad_recv, grad_recv_weights))
    }

    /// The backward of combine. `grad_out` is `[T, H]` of the combine dtype on the source rank;
    /// returns `grad_y` in the dispatch layout on the expert rank. Expert-major with `y` given, also
    /// returns the weights' gradient `[T, K]` to the source rank. Token-major takes no `y`.
    pub fn combine_backward(
        &mut self,
        handle: &Handle,
        grad_out: TensorRef<'_>,
        y: Option<TensorRef<'_>>,
    ) -> Result<CombineBackwardOutput> {
        self.check_usable()?;
        let h = self.check_handle(handle)?;
        validate::device("grad_out", &grad_out, self.backend.device())?;
        validate::dtype("grad_out", &grad_out, self.config.combine_dtype)?;
        let t = validate::matrix("grad_out", &grad_out, self.config.hidden, "T")?;
        if t != h.num_tokens {
            return Err(EpError::CachedTokenCount {
                arg: "grad_out",
                expected: h.num_tokens,
                actual: t,
            });
        }
        if self.config.layout == Layout::TokenMajor {
            // Token-major combine is unweighted: there is no weight gradient to take `y` for.
            validate::presence("y", y.is_some(), false, "")?;
        }
        if let Some(y) = &y {
            self.check_rows_back("y", y, h)?;
        }
        self.run(|b| b.combine_backward(h, grad_out, y))
    }

    fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn run<T>(&mut self, op: impl FnOnce(&mut dyn Backend) -> Result<T>) -> Result<T> {
        let result = op(self.backend.as_mut());
        if let Err(e) = &result {
            if e.poisons() {
                self.poisoned = Some(e.clone());
            }
        }
        result
    }

    fn check_handle<'h>(&self, handle: &'h Handle) -> Result<&'h HandleInner> {
        validate::handle(&handle.inner, self.id, self.config.layout)?;
        Ok(&handle.inner)
    }

    fn check_topk_shape(&self, arg: &'static str, t: &TensorRef<'_>, rows: usize) -> Result<()> {
        let d = t.dims();
        if d.len() != 2 || d[0] != rows {
            return Err(EpError::Shape {
                arg,
                expected: format!("[{rows}, {}] (T from x)", self.config.topk),
                actual: t.shape().to_string(),
            });
        }
        if d[1] != self.config.topk {
            return Err(EpError::TopkMismatch {
                arg,
                expected: self.config.topk,
                actual: d[1],
            });
        }
        Ok(())
    }

    fn check_scales(&self, scales: Option<&TensorRef<'_>>, t: usize) -> Result<()> {
        let s = self.config.scale_columns;
        validate::presence(
            "scales",
            scales.is_some(),
            s > 0,
            "a [T, S] f32 tensor (scale_columns > 0)",
        )?;
        if let Some(sc) = scales {
            validate::exact("scales", sc, DType::F32, t, Some(s), self.backend.device())?;
        }
        Ok(())
    }

    /// Per-row tensors handed back: the combine dtype, `[rows >= handle's rows, H]`.
    fn check_rows_back(&self, arg: &'static str, t: &TensorRef<'_>, h: &HandleInner) -> Result<()> {
        validate::device(arg, t, self.backend.device())?;
        validate::dtype(arg, t, self.config.combine_dtype)?;
        validate::rows_at_least(arg, t, h.num_rows, Some(self.config.hidden))
    }

    /// Per-row weights handed back: token-major `[rows, K]`, expert-major `[rows]`, f32.
    fn check_row_weights(
        &self,
        arg: &'static str,
        t: &TensorRef<'_>,
        h: &HandleInner,
    ) -> Result<()> {
        validate::device(arg, t, self.backend.device())?;
        validate::dtype(arg, t, DType::F32)?;
        let cols = match self.config.layout {
            Layout::TokenMajor => Some(self.config.topk),
            Layout::ExpertMajor { .. } => None,
        };
        validate::rows_at_least(arg, t, h.num_rows, cols)
    }
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("id", &self.id)
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("layout", &self.config.layout)
            .field("poisoned", &self.poisoned.is_some())
            .finish()
    }
}
