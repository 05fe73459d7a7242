//! What the dispatcher's calls return.

use crate::error::Result;
use crate::tensor::Tensor;

/// The output of [`crate::Dispatcher::dispatch`] on one rank.
///
/// Row counts: with [`crate::OutputSizing::Capacity`] (the default) every per-row tensor has the
/// receive capacity's rows and only the leading rows are valid (see the count tensors, or
/// [`DispatchOutput::valid_rows`]); with [`crate::OutputSizing::Exact`] they have exactly the valid
/// rows and `host_counts` is set. Unused rows have unspecified payload; their `src` is -1.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DispatchOutput {
    /// `[rows, H]`, the dispatcher's `dtype`: the received tokens, bit for bit.
    pub x: Tensor,
    /// `[rows, S]` f32, when the dispatcher has scale columns.
    pub scales: Option<Tensor>,
    /// Token-major only: `[rows, K]` i32, the local index of each slot's expert on this rank, or -1
    /// where the slot's expert lives elsewhere (or the slot was -1).
    pub topk_idx: Option<Tensor>,
    /// When dispatch was given weights. Token-major: `[rows, K]` f32, the slot's weight where its
    /// expert is on this rank, else 0. Expert-major: `[rows]` f32, the weight of the row's slot.
    pub topk_weights: Option<Tensor>,
    /// The source of each row, i32. Token-major `[rows, 2]` = (source rank, token);
    /// expert-major `[rows, 3]` = (source rank, token, slot). -1 on unused rows.
    pub src: Tensor,
    /// Expert-major only: `[rows]` i32, the local expert of each row, -1 on padding rows.
    pub local_expert: Option<Tensor>,
    /// `[world]` i32: tokens received from each source rank.
    pub num_recv_per_src: Tensor,
    /// `[E_local]` i32: slots received for each local expert (exact, no padding).
    pub num_recv_per_local_expert: Tensor,
    /// Expert-major only: `[E_local + 1]` i32, the aligned first row of each local expert's group;
    /// the last entry is the padded total.
    pub expert_offsets: Option<Tensor>,
    /// Host-side counts, with [`crate::OutputSizing::Exact`].
    pub host_counts: Option<HostCounts>,
}

impl DispatchOutput {
    /// Rows that hold received data: token-major, the received tokens; expert-major, the padded
    /// total. Reads the count tensors (a host synchronization on a GPU backend).
    pub fn valid_rows(&self) -> Result<usize> {
        if let Some(h) = &self.host_counts {
            return Ok(h.rows);
        }
        Ok(match &self.expert_offsets {
            Some(off) => off
                .to_host()?
                .as_slice::<i32>()?
                .last()
                .copied()
                .unwrap_or(0) as usize,
            None => self
                .num_recv_per_src
                .to_host()?
                .as_slice::<i32>()?
                .iter()
                .map(|&n| n as usize)
                .sum(),
        })
    }

    /// A copy with every tensor on the host.
    pub fn to_host(&self) -> Result<DispatchOutput> {
        Ok(DispatchOutput {
            x: self.x.to_host()?,
            scales: opt_host(&self.scales)?,
            topk_idx: opt_host(&self.topk_idx)?,
            topk_weights: opt_host(&self.topk_weights)?,
            src: self.src.to_host()?,
            local_expert: opt_host(&self.local_expert)?,
            num_recv_per_src: self.num_recv_per_src.to_host()?,
            num_recv_per_local_expert: self.num_recv_per_local_expert.to_host()?,
            expert_offsets: opt_host(&self.expert_offsets)?,
            host_counts: self.host_counts.clone(),
        })
    }

    /// Keeps the first `rows` rows of every per-row tensor.
    pub(crate) fn truncate_rows(&mut self, rows: usize) -> Result<()> {
        self.x.truncate_rows(rows)?;
        self.src.truncate_rows(rows)?;
        for t in [
            &mut self.scales,
            &mut self.topk_idx,
            &mut self.topk_weights,
            &mut self.local_expert,
        ]
        .into_iter()
        .flatten()
        {
            t.truncate_rows(rows)?;
        }
        Ok(())
    }
}

fn opt_host(t: &Option<Tensor>) -> Result<Option<Tensor>> {
    t.as_ref().map(Tensor::to_host).transpose()
}

/// Exact counts on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCounts {
    /// Valid rows (expert-major: including alignment padding).
    pub rows: usize,
    pub per_src: Vec<usize>,
    pub per_local_expert: Vec<usize>,
    /// Expert-major only: `E_local + 1` aligned group starts.
    pub expert_offsets: Option<Vec<usize>>,
}

/// The output of [`crate::Dispatcher::dispatch_cached`]: the new payload at the recorded rows.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CachedDispatchOutput {
    pub x: Tensor,
    pub scales: Option<Tensor>,
}

impl CachedDispatchOutput {
    /// A copy with every tensor on the host.
    pub fn to_host(&self) -> Result<Self> {
        Ok(CachedDispatchOutput {
            x: self.x.to_host()?,
            scales: opt_host(&self.scales)?,
        })
    }
}

/// The output of [`crate::Dispatcher::combine`] on the source rank.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CombineOutput {
    /// `[T, H]`, the combine dtype.
    pub x: Tensor,
    /// Token-major with `weights` given: `[T, K]` f32, the per-slot sums.
    pub weights: Option<Tensor>,
}

impl CombineOutput {
    /// A copy with every tensor on the host.
    pub fn to_host(&self) -> Result<Self> {
        Ok(CombineOutput {
            x: self.x.to_host()?,
            weights: opt_host(&self.weights)?,
        })
    }
}

/// The output of [`crate::Dispatcher::dispatch_backward`] on the source rank.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DispatchBackwardOutput {
    /// `[T, H]`, the combine dtype: the sum of the gradients of every copy of each token.
    pub grad_x: Tensor,
    /// `[T, K]` f32, when `grad_recv_weights` was given.
    pub grad_weights: Option<Tensor>,
}

impl DispatchBackwardOutput {
    /// A copy with every tensor on the host.
    pub fn to_host(&self) -> Result<Self> {
        Ok(DispatchBackwardOutput {
            grad_x: self.grad_x.to_host()?,
            grad_weights: opt_host(&self.grad_weights)?,
        })
    }
}

/// The output of [`crate::Dispatcher::combine_backward`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CombineBackwardOutput {
    /// On the expert rank, in the dispatch layout and row order: the gradient of combine's `y`.
    pub grad_y: Tensor,
    /// On the source rank, `[T, K]` f32: the gradient of the weights (expert-major with `y` given).
    pub grad_weights: Option<Tensor>,
}

impl CombineBackwardOutput {
    /// A copy with every tensor on the host.
    pub fn to_host(&self) -> Result<Self> {
        Ok(CombineBackwardOutput {
            grad_y: self.grad_y.to_host()?,
            grad_weights: opt_host(&self.grad_weights)?,
        })
    }
}
