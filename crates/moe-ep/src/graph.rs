//! Captured work a rank can replay: a CUDA graph of dispatcher calls.

use crate::error::{EpError, Result};

/// The calls recorded by [`crate::Dispatcher::capture_graph`], replayed as one CUDA graph. Every
/// rank captures the same calls and replays its graph as often as the others, in the same order
/// relative to its other calls: a replay is those calls again, collective as they were.
pub struct Graph {
    graph: crate::ffi::cuda_stream::RecordedGraph,
}

impl Graph {
    pub(crate) fn cuda(graph: crate::ffi::cuda_stream::RecordedGraph) -> Self {
        Graph { graph }
    }

    /// Runs the recorded calls again on the dispatcher's stream (asynchronously: use
    /// [`crate::Dispatcher::synchronize`] to wait and to see device-side errors).
    pub fn replay(&self) -> Result<()> {
        self.graph
            .launch()
            .map_err(|e| EpError::BackendUnavailable {
                backend: "cuda",
                reason: format!("cuGraphLaunch: {e:?}"),
            })
    }
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Graph")
    }
}
