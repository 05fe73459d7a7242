//! The operations every backend implements, on arguments the dispatcher has already validated.

pub(crate) mod cpu;
pub(crate) mod cuda;
pub(crate) mod rendezvous;
pub(crate) mod tcp_rendezvous;

use crate::config::EpConfig;
use crate::error::Result;
use crate::handle::HandleInner;
use crate::output::{
    CachedDispatchOutput, CombineBackwardOutput, CombineOutput, DispatchBackwardOutput,
    DispatchOutput,
};
use crate::tensor::{Device, Tensor, TensorRef};

/// A config as ranks compare it when a dispatcher is built: (field, value) in a fixed order.
pub(crate) type ConfigFields = Vec<(String, String)>;

/// The config, field by field, as ranks compare it when a dispatcher is built.
pub(crate) fn config_fields(c: &EpConfig) -> ConfigFields {
    vec![
        ("num_experts".into(), c.num_experts.to_string()),
        ("topk".into(), c.topk.to_string()),
        ("hidden".into(), c.hidden.to_string()),
        (
            "max_tokens_per_rank".into(),
            c.max_tokens_per_rank.to_string(),
        ),
        ("dtype".into(), c.dtype.to_string()),
        ("combine_dtype".into(), c.combine_dtype.to_string()),
        ("layout".into(), format!("{:?}", c.layout)),
        ("scale_columns".into(), c.scale_columns.to_string()),
        ("placement".into(), format!("{:?}", c.placement)),
        ("recv_capacity".into(), format!("{:?}", c.recv_capacity)),
        ("output_sizing".into(), format!("{:?}", c.output_sizing)),
    ]
}

/// The first field in which a peer built another config than this rank, as an error.
pub(crate) fn check_configs<'a>(
    rank: usize,
    mine: &ConfigFields,
    all: impl IntoIterator<Item = &'a ConfigFields>,
) -> Result<()> {
    for (peer, theirs) in all.into_iter().enumerate() {
        if let Some((a, b)) = mine.iter().zip(theirs).find(|(a, b)| a != b) {
            return Err(crate::error::EpError::ConfigMismatch {
                rank,
                peer,
                expected: format!("{} = {}", a.0, a.1),
                actual: format!("{} = {}", b.0, b.1),
            });
        }
    }
    Ok(())
}

/// A backend's private routing state inside a [`crate::Handle`].
pub(crate) enum BackendHandle {
    Cpu(cpu::CpuHandle),
    // Boxed: the CUDA routing state is several device buffers, the CPU one a few vectors.
    Cuda(Box<cuda::CudaHandle>),
}

/// Dispatch arguments after validation: shapes, dtypes and devices match the config.
pub(crate) struct DispatchArgs<'a> {
    pub x: TensorRef<'a>,
    /// Read in place by device backends; the CPU backend uses `topk_host`.
    #[allow(dead_code)]
    pub topk_idx: TensorRef<'a>,
    /// `topk_idx` read to the host as i32 and range-checked, when it lives on the host.
    pub topk_host: Option<Vec<i32>>,
    pub weights: Option<TensorRef<'a>>,
    pub scales: Option<TensorRef<'a>>,
}

/// What dispatch produces: the output and the handle's fields.
pub(crate) struct Dispatched {
    pub output: DispatchOutput,
    pub num_rows: usize,
    pub out_rows: usize,
    pub state: BackendHandle,
}

pub(crate) trait Backend: Send {
    /// Where this backend wants its inputs.
    fn device(&self) -> Device;

    /// Waits for this rank's queued work and reports errors found on the device since the last
    /// synchronization.
    fn synchronize(&mut self) -> Result<()>;

    /// A copy of host data where this backend wants its inputs.
    fn to_device(&self, host: TensorRef<'_>) -> Result<Tensor>;

    /// Every rank's `bytes`, indexed by rank, through the group's control plane (host memory).
    fn all_gather_host(&mut self, bytes: Vec<u8>) -> Result<Vec<Vec<u8>>>;

    /// Waits until every rank reached this point, in the order of this rank's calls. The host
    /// rendezvous by default; a GPU backend waits on the device instead, without the host.
    fn barrier(&mut self) -> Result<()> {
        self.all_gather_host(Vec::new()).map(|_| ())
    }

    /// Holds this rank's stream until the returned gate opens (see
    /// [`crate::Dispatcher::hold_stream`]); `None` where calls run on the host.
    fn hold_stream(&mut self) -> Result<Option<crate::timer::StreamGate>> {
        Ok(None)
    }

    /// The raw CUDA stream this rank's calls run on (`None` on the CPU).
    fn cuda_stream(&self) -> Option<u64>;

    /// Runs this rank's later calls on the caller's `CUstream`.
    ///
    /// # Safety
    /// As [`crate::Dispatcher::set_cuda_stream`].
    unsafe fn set_cuda_stream(&mut self, stream: u64) -> Result<()>;

    /// Starts recording this rank's work into a graph instead of running it.
    fn begin_capture(&mut self) -> Result<()>;

    /// Stops recording and returns the graph, ready to replay.
    fn end_capture(&mut self) -> Result<crate::graph::Graph>;

    fn dispatch(&mut self, args: DispatchArgs<'_>) -> Result<Dispatched>;

    fn dispatch_cached(
        &mut self,
        handle: &HandleInner,
        x: TensorRef<'_>,
        scales: Option<TensorRef<'_>>,
    ) -> Result<CachedDispatchOutput>;

    fn combine(
        &mut self,
        handle: &HandleInner,
        y: TensorRef<'_>,
        weights: Option<TensorRef<'_>>,
    ) -> Result<CombineOutput>;

    fn dispatch_backward(
        &mut self,
        handle: &HandleInner,
        grad_recv: TensorRef<'_>,
        grad_recv_weights: Option<TensorRef<'_>>,
    ) -> Result<DispatchBackwardOutput>;

    fn combine_backward(
        &mut self,
        handle: &HandleInner,
        grad_out: TensorRef<'_>,
        y: Option<TensorRef<'_>>,
    ) -> Result<CombineBackwardOutput>;
}
