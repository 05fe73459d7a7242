//! Argument checks shared by every backend. Each runs before anything is sent, and each error names
//! the argument, the expected and the actual value.

use crate::config::Layout;
use crate::dtype::DType;
use crate::error::{EpError, Result};
use crate::handle::HandleInner;
use crate::tensor::{Device, TensorRef};

pub(crate) fn device(arg: &'static str, t: &TensorRef<'_>, want: Device) -> Result<()> {
    if t.device() != want {
        return Err(EpError::Device {
            arg,
            expected: want.to_string(),
            actual: t.device().to_string(),
        });
    }
    Ok(())
}

pub(crate) fn dtype(arg: &'static str, t: &TensorRef<'_>, want: DType) -> Result<()> {
    if t.dtype() != want {
        return Err(EpError::DType {
            arg,
            expected: want.to_string(),
            actual: t.dtype().to_string(),
        });
    }
    Ok(())
}

fn shape_error(arg: &'static str, expected: String, t: &TensorRef<'_>) -> EpError {
    EpError::Shape {
        arg,
        expected,
        actual: t.shape().to_string(),
    }
}

/// A 2-D `[rows, cols]` tensor with exactly `cols` columns; returns its rows.
pub(crate) fn matrix(
    arg: &'static str,
    t: &TensorRef<'_>,
    cols: usize,
    what: &str,
) -> Result<usize> {
    let d = t.dims();
    if d.len() != 2 || d[1] != cols {
        return Err(shape_error(arg, format!("[{what}, {cols}]"), t));
    }
    Ok(d[0])
}

/// A host or device tensor of `want` dtype, `[rows, cols]` (or `[rows]` when `cols` is None).
pub(crate) fn exact(
    arg: &'static str,
    t: &TensorRef<'_>,
    want: DType,
    rows: usize,
    cols: Option<usize>,
    dev: Device,
) -> Result<()> {
    device(arg, t, dev)?;
    dtype(arg, t, want)?;
    let ok = match cols {
        Some(c) => t.dims() == [rows, c],
        None => t.dims() == [rows],
    };
    if !ok {
        let expected = match cols {
            Some(c) => format!("[{rows}, {c}]"),
            None => format!("[{rows}]"),
        };
        return Err(shape_error(arg, expected, t));
    }
    Ok(())
}

/// Per-row tensors given back to the dispatcher (combine's `y`, gradients): at least `need` rows.
pub(crate) fn rows_at_least(
    arg: &'static str,
    t: &TensorRef<'_>,
    need: usize,
    cols: Option<usize>,
) -> Result<()> {
    let d = t.dims();
    let ok = match cols {
        Some(c) => d.len() == 2 && d[0] >= need && d[1] == c,
        None => d.len() == 1 && d[0] >= need,
    };
    if !ok {
        let expected = match cols {
            Some(c) => format!("[at least {need}, {c}]"),
            None => format!("[at least {need}]"),
        };
        return Err(shape_error(arg, expected, t));
    }
    Ok(())
}

pub(crate) fn presence(
    arg: &'static str,
    given: bool,
    wanted: bool,
    why: &'static str,
) -> Result<()> {
    if given != wanted {
        return Err(EpError::Presence {
            arg,
            expected: if wanted { why } else { "none" },
            actual: if given { "a tensor" } else { "none" },
        });
    }
    Ok(())
}

/// Checks a handle against the dispatcher that is about to use it.
pub(crate) fn handle(h: &HandleInner, dispatcher_id: u64, layout: Layout) -> Result<()> {
    if h.layout.name() != layout.name() {
        return Err(EpError::HandleLayout {
            expected: layout.name(),
            actual: h.layout.name(),
        });
    }
    if h.dispatcher_id != dispatcher_id {
        return Err(EpError::ForeignHandle {
            expected: dispatcher_id,
            actual: h.dispatcher_id,
        });
    }
    Ok(())
}

/// Reads host `topk_idx` (i32 or i64) into i32, checking every id is -1 or in `[0, num_experts)`.
pub(crate) fn read_topk_host(t: &TensorRef<'_>, k: usize, num_experts: usize) -> Result<Vec<i32>> {
    let check = |i: usize, v: i64| -> Result<i32> {
        if v == -1 || (0..num_experts as i64).contains(&v) {
            Ok(v as i32)
        } else {
            Err(EpError::ExpertOutOfRange {
                arg: "topk_idx",
                row: i / k,
                col: i % k,
                value: v,
                num_experts,
            })
        }
    };
    match t.dtype() {
        DType::I32 => t
            .host_slice::<i32>("topk_idx")?
            .iter()
            .enumerate()
            .map(|(i, &v)| check(i, v as i64))
            .collect(),
        DType::I64 => t
            .host_slice::<i64>("topk_idx")?
            .iter()
            .enumerate()
            .map(|(i, &v)| check(i, v))
            .collect(),
        other => Err(EpError::DType {
            arg: "topk_idx",
            expected: "i32 or i64".into(),
            actual: other.to_string(),
        }),
    }
}
