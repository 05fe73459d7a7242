//! The routing handle a dispatch returns.

use crate::backend::BackendHandle;
use crate::config::Layout;
use std::sync::Arc;

/// Everything needed to route back (combine) and to replay (cached dispatch), as one rank saw a
/// dispatch. Immutable and cheap to clone; later calls never change it, so one handle per layer
/// can stay alive and handles can be used in any order.
#[derive(Clone)]
pub struct Handle {
    pub(crate) inner: Arc<HandleInner>,
}

pub(crate) struct HandleInner {
    pub(crate) dispatcher_id: u64,
    pub(crate) layout: Layout,
    pub(crate) num_tokens: usize,
    /// Rows of the dispatch output this rank must be given back in combine (expert-major: the
    /// padded total).
    pub(crate) num_rows: usize,
    /// Rows of the dispatch output tensors (capacity or exact).
    pub(crate) out_rows: usize,
    pub(crate) has_weights: bool,
    pub(crate) state: BackendHandle,
}

impl Handle {
    /// The token count T of the dispatch that made this handle.
    pub fn num_tokens(&self) -> usize {
        self.inner.num_tokens
    }

    pub fn layout(&self) -> Layout {
        self.inner.layout
    }

    /// The dispatcher that made this handle (see [`crate::Dispatcher::id`]).
    pub fn dispatcher_id(&self) -> u64 {
        self.inner.dispatcher_id
    }

    /// Whether dispatch was given weights.
    pub fn has_weights(&self) -> bool {
        self.inner.has_weights
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("dispatcher", &self.inner.dispatcher_id)
            .field("layout", &self.inner.layout)
            .field("num_tokens", &self.inner.num_tokens)
            .finish()
    }
}
