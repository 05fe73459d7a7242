//! moe-ep: Mixture-of-Experts expert-parallel communication.
//!
//! **Dispatch** sends each token to the ranks owning its top-k experts; **combine** brings the
//! expert outputs back and reduces them per token. The contract every backend meets is in
//! `docs/semantics.md`; the CPU backend (ranks as threads) is its reference implementation.
//!
//! ```
//! use moe_ep::{Dispatcher, EpConfig, Group, TensorRef};
//! use half::bf16;
//!
//! let config = EpConfig::builder().num_experts(4).topk(2).hidden(8).max_tokens_per_rank(3).build()?;
//! let groups = Group::cpu_world(2)?;
//! std::thread::scope(|s| {
//!     for group in groups {
//!         let config = config.clone();
//!         s.spawn(move || -> moe_ep::Result<()> {
//!             let mut ep = Dispatcher::new(&group, config)?;
//!             let x = vec![bf16::from_f32(group.rank() as f32); 3 * 8];
//!             let topk = vec![0i32, 3, 1, -1, 2, 2];
//!             let (out, handle) = ep.dispatch(TensorRef::new(&x, &[3, 8])?, TensorRef::new(&topk, &[3, 2])?, None, None)?;
//!             // ... run the local experts on out.x, then bring the results back:
//!             let combined = ep.combine(&handle, out.x.view(), None)?;
//!             assert_eq!(combined.x.dims(), &[3, 8]);
//!             Ok(())
//!         });
//!     }
//! });
//! # Ok::<(), moe_ep::EpError>(())
//! ```

mod backend;
pub mod baseline;
mod config;
mod dispatcher;
mod dtype;
mod error;
mod ffi;
mod graph;
mod group;
mod handle;
mod numerics;
mod output;
mod placement;
pub mod probe;
pub mod routing;
mod tensor;
mod timer;
mod validate;

pub use config::{EpConfig, EpConfigBuilder, Layout, OutputSizing, PlacementSpec, MAX_TOPK};
pub use dispatcher::Dispatcher;
pub use dtype::{DType, Element};
pub use error::{EpError, Result};
pub use graph::Graph;
pub use group::{BackendKind, Group};
pub use handle::Handle;
pub use output::{
    CachedDispatchOutput, CombineBackwardOutput, CombineOutput, DispatchBackwardOutput,
    DispatchOutput, HostCounts,
};
pub use placement::Placement;
pub use tensor::{Device, Shape, Tensor, TensorRef};
pub use timer::{StreamGate, Timed, Timer};
