//! [`EpConfig`]: everything a dispatcher needs to know before the first call, validated when built.

use crate::dtype::DType;
use crate::error::{EpError, Result};
use std::time::Duration;

/// Row order of the dispatch output on the receiving rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// One row per (source rank, token), ordered by source then token.
    TokenMajor,
    /// One row per (source, token, slot) grouped by local expert; each group starts at a multiple
    /// of `align` rows (a grouped GEMM's tile height).
    ExpertMajor { align: usize },
}

impl Layout {
    pub fn name(&self) -> &'static str {
        match self {
            Layout::TokenMajor => "token-major",
            Layout::ExpertMajor { .. } => "expert-major",
        }
    }
}

/// Which rank owns each expert.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PlacementSpec {
    /// `rank_of(e) = e / (num_experts / world)`; needs `num_experts % world == 0`.
    Contiguous,
    /// `expert_to_rank[e]`, one entry per expert.
    Table(Vec<usize>),
}

/// Shape of the dispatch outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputSizing {
    /// Outputs have the receive capacity's rows; the valid count is in the count tensors. No host
    /// synchronization is needed (the GPU default, graph-capturable).
    Capacity,
    /// Outputs have exactly the received rows, and host-side counts are returned (one host sync on
    /// a GPU backend).
    Exact,
}

/// The validated configuration of a dispatcher. Build it with [`EpConfig::builder`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EpConfig {
    pub(crate) num_experts: usize,
    pub(crate) topk: usize,
    pub(crate) hidden: usize,
    pub(crate) max_tokens_per_rank: usize,
    pub(crate) dtype: DType,
    pub(crate) combine_dtype: DType,
    pub(crate) layout: Layout,
    pub(crate) scale_columns: usize,
    pub(crate) placement: PlacementSpec,
    pub(crate) recv_capacity: Option<usize>,
    pub(crate) output_sizing: OutputSizing,
    pub(crate) timeout: Duration,
    pub(crate) num_sms: Option<u32>,
}

/// Largest supported top-k (slots per token).
pub const MAX_TOPK: usize = 64;

impl EpConfig {
    pub fn builder() -> EpConfigBuilder {
        EpConfigBuilder::default()
    }

    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    pub fn topk(&self) -> usize {
        self.topk
    }
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    pub fn max_tokens_per_rank(&self) -> usize {
        self.max_tokens_per_rank
    }
    /// Element type of dispatch's `x`.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Element type of combine's `y` and output, and of the gradients.
    pub fn combine_dtype(&self) -> DType {
        self.combine_dtype
    }
    pub fn layout(&self) -> Layout {
        self.layout
    }
    /// Columns of the per-token f32 side data (`scales`); 0 means no scales.
    pub fn scale_columns(&self) -> usize {
        self.scale_columns
    }
    pub fn placement(&self) -> &PlacementSpec {
        &self.placement
    }
    pub fn recv_capacity(&self) -> Option<usize> {
        self.recv_capacity
    }
    pub fn output_sizing(&self) -> OutputSizing {
        self.output_sizing
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
    pub fn num_sms(&self) -> Option<u32> {
        self.num_sms
    }

    /// Worst-case receive rows for `world` ranks with `local_experts` experts on the receiver, so
    /// that no call can overflow: token-major, every token of every rank; expert-major, every slot
    /// of every token plus the alignment padding of every group.
    pub fn worst_case_rows(&self, world: usize, local_experts: usize) -> usize {
        let tokens = world * self.max_tokens_per_rank;
        match self.layout {
            Layout::TokenMajor => tokens,
            Layout::ExpertMajor { align } => {
                if local_experts == 0 {
                    0
                } else {
                    tokens * self.topk + local_experts * (align - 1)
                }
            }
        }
    }
}

/// Builder for [`EpConfig`]. `num_experts`, `topk`, `hidden` and `max_tokens_per_rank` are
/// required; the rest default to bf16, token-major, no scales, contiguous placement, worst-case
/// capacity, capacity-sized outputs and a 60 s timeout.
#[derive(Debug, Clone)]
pub struct EpConfigBuilder {
    num_experts: Option<usize>,
    topk: Option<usize>,
    hidden: Option<usize>,
    max_tokens_per_rank: Option<usize>,
    dtype: DType,
    combine_dtype: Option<DType>,
    layout: Layout,
    scale_columns: usize,
    placement: PlacementSpec,
    recv_capacity: Option<usize>,
    output_sizing: OutputSizing,
    timeout: Duration,
    num_sms: Option<u32>,
}

impl Default for EpConfigBuilder {
    fn default() -> Self {
        EpConfigBuilder {
            num_experts: None,
            topk: None,
            hidden: None,
            max_tokens_per_rank: None,
            dtype: DType::BF16,
            combine_dtype: None,
            layout: Layout::TokenMajor,
            scale_columns: 0,
            placement: PlacementSpec::Contiguous,
            recv_capacity: None,
            output_sizing: OutputSizing::Capacity,
            timeout: Duration::from_secs(60),
            num_sms: None,
        }
    }
}

fn invalid(field: &'static str, expected: impl Into<String>, actual: impl ToString) -> EpError {
    EpError::InvalidConfig {
        field,
        expected: expected.into(),
        actual: actual.to_string(),
    }
}

fn required(field: &'static str, value: Option<usize>) -> Result<usize> {
    match value {
        None => Err(invalid(field, "a value (required)", "none")),
        Some(0) => Err(invalid(field, "at least 1", 0)),
        Some(v) => Ok(v),
    }
}

impl EpConfigBuilder {
    pub fn num_experts(mut self, n: usize) -> Self {
        self.num_experts = Some(n);
        self
    }
    pub fn topk(mut self, k: usize) -> Self {
        self.topk = Some(k);
        self
    }
    pub fn hidden(mut self, h: usize) -> Self {
        self.hidden = Some(h);
        self
    }
    pub fn max_tokens_per_rank(mut self, t: usize) -> Self {
        self.max_tokens_per_rank = Some(t);
        self
    }
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
    /// Defaults to `dtype`, or bf16 when `dtype` is fp8.
    pub fn combine_dtype(mut self, dtype: DType) -> Self {
        self.combine_dtype = Some(dtype);
        self
    }
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }
    pub fn scale_columns(mut self, s: usize) -> Self {
        self.scale_columns = s;
        self
    }
    pub fn placement(mut self, placement: PlacementSpec) -> Self {
        self.placement = placement;
        self
    }
    pub fn recv_capacity(mut self, rows: usize) -> Self {
        self.recv_capacity = Some(rows);
        self
    }
    pub fn output_sizing(mut self, sizing: OutputSizing) -> Self {
        self.output_sizing = sizing;
        self
    }
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    pub fn num_sms(mut self, n: u32) -> Self {
        self.num_sms = Some(n);
        self
    }

    /// Checks every field that does not depend on the group; the placement against the world size
    /// is checked by [`crate::Dispatcher::new`].
    pub fn build(self) -> Result<EpConfig> {
        let num_experts = required("num_experts", self.num_experts)?;
        let topk = required("topk", self.topk)?;
        let hidden = required("hidden", self.hidden)?;
        let max_tokens_per_rank = required("max_tokens_per_rank", self.max_tokens_per_rank)?;
        if topk > MAX_TOPK {
            return Err(invalid("topk", format!("at most {MAX_TOPK}"), topk));
        }
        if !self.dtype.is_payload() {
            return Err(invalid("dtype", "bf16, f16, f32 or fp8_e4m3", self.dtype));
        }
        let combine_dtype = self.combine_dtype.unwrap_or(if self.dtype.is_reducible() {
            self.dtype
        } else {
            DType::BF16
        });
        if !combine_dtype.is_reducible() {
            return Err(invalid("combine_dtype", "bf16, f16 or f32", combine_dtype));
        }
        if let Layout::ExpertMajor { align } = self.layout {
            if align == 0 {
                return Err(invalid("layout.align", "at least 1", 0));
            }
        }
        if let PlacementSpec::Table(table) = &self.placement {
            if table.len() != num_experts {
                return Err(invalid(
                    "placement",
                    format!("a table of num_experts = {num_experts} entries"),
                    format!("{} entries", table.len()),
                ));
            }
        }
        if self.recv_capacity == Some(0) {
            return Err(invalid("recv_capacity", "at least 1 row", 0));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout", "a positive duration", "0 s"));
        }
        if self.num_sms == Some(0) {
            return Err(invalid("num_sms", "at least 1", 0));
        }
        Ok(EpConfig {
            num_experts,
            topk,
            hidden,
            max_tokens_per_rank,
            dtype: self.dtype,
            combine_dtype,
            layout: self.layout,
            scale_columns: self.scale_columns,
            placement: self.placement,
            recv_capacity: self.recv_capacity,
            output_sizing: self.output_sizing,
            timeout: self.timeout,
            num_sms: self.num_sms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> EpConfigBuilder {
        EpConfig::builder()
            .num_experts(8)
            .topk(2)
            .hidden(16)
            .max_tokens_per_rank(4)
    }

    #[test]
    fn defaults() {
        let c = base().build().unwrap();
        assert_eq!(c.dtype(), DType::BF16);
        assert_eq!(c.combine_dtype(), DType::BF16);
        assert_eq!(c.layout(), Layout::TokenMajor);
        assert_eq!(c.timeout(), Duration::from_secs(60));
        let fp8 = base().dtype(DType::Fp8E4M3).build().unwrap();
        assert_eq!(fp8.combine_dtype(), DType::BF16);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(EpConfigBuilder, &str)> = vec![
            (
                EpConfig::builder().topk(2).hidden(4).max_tokens_per_rank(1),
                "num_experts",
            ),
            (base().topk(0), "topk"),
            (base().topk(65), "topk"),
            (base().hidden(0), "hidden"),
            (base().dtype(DType::I32), "dtype"),
            (base().combine_dtype(DType::Fp8E4M3), "combine_dtype"),
            (
                base().layout(Layout::ExpertMajor { align: 0 }),
                "layout.align",
            ),
            (
                base().placement(PlacementSpec::Table(vec![0; 7])),
                "placement",
            ),
            (base().recv_capacity(0), "recv_capacity"),
            (base().timeout(Duration::ZERO), "timeout"),
        ];
        for (builder, field) in cases {
            match builder.build() {
                Err(EpError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn worst_case_rows() {
        let tm = base().build().unwrap();
        assert_eq!(tm.worst_case_rows(2, 4), 8);
        let em = base()
            .layout(Layout::ExpertMajor { align: 4 })
            .build()
            .unwrap();
        assert_eq!(em.worst_case_rows(2, 4), 2 * 4 * 2 + 4 * 3);
        assert_eq!(em.worst_case_rows(2, 0), 0);
    }
}
