//! Row arithmetic of combine and the backward ops, written once so every CPU path rounds the same
//! way: decode to f32, accumulate with `f32::mul_add` (or `+` for weight 1, which is the same single
//! rounding) in the order the contract states, round once to the output type.

use crate::dtype::DType;
use half::{bf16, f16};

/// A type combine can reduce: exact widening to f32, round-to-nearest-even narrowing.
trait Reducible: bytemuck::Pod {
    fn widen(self) -> f32;
    fn narrow(v: f32) -> Self;
}

impl Reducible for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
impl Reducible for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(v: f32) -> Self {
        f16::from_f32(v)
    }
}
impl Reducible for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn narrow(v: f32) -> Self {
        v
    }
}

/// Runs `$body` with `$t` bound to the Rust type of a reducible `$dtype`.
macro_rules! with_reducible {
    ($dtype:expr, $t:ident, $body:block) => {
        match $dtype {
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::F32 => {
                type $t = f32;
                $body
            }
            other => unreachable!("{other} is not reducible; validation admits bf16, f16, f32"),
        }
    };
}

/// `acc[h] = weight * row[h] + acc[h]` with one rounding, or `acc[h] + row[h]` without a weight.
pub(crate) fn accumulate(acc: &mut [f32], row: &[u8], dtype: DType, weight: Option<f32>) {
    with_reducible!(dtype, T, {
        let row: &[T] = bytemuck::cast_slice(row);
        match weight {
            Some(w) => {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a = w.mul_add(v.widen(), *a);
                }
            }
            None => {
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v.widen();
                }
            }
        }
    })
}

/// Rounds `acc` once into `out` (elements of `dtype`).
pub(crate) fn store(acc: &[f32], out: &mut [u8], dtype: DType) {
    with_reducible!(dtype, T, {
        let out: &mut [T] = bytemuck::cast_slice_mut(out);
        for (o, &a) in out.iter_mut().zip(acc) {
            *o = T::narrow(a);
        }
    })
}

/// `out[h] = round(weight * row[h])`: the f32 product, then one rounding to `dtype`.
pub(crate) fn scale(weight: f32, row: &[u8], out: &mut [u8], dtype: DType) {
    with_reducible!(dtype, T, {
        let row: &[T] = bytemuck::cast_slice(row);
        let out: &mut [T] = bytemuck::cast_slice_mut(out);
        for (o, &v) in out.iter_mut().zip(row) {
            *o = T::narrow(weight * v.widen());
        }
    })
}

/// Lanes of the warp-shaped dot product (a GPU warp's width).
pub(crate) const DOT_LANES: usize = 32;

/// `dot(a, b)` in the order a GPU warp computes it, so every backend gets the same bits: lane `l`
/// accumulates `a[h] * b[h]` for `h = l, l + 32, l + 64, ...` with fused multiply-adds from 0, then
/// the lanes are folded by halves (`p[l] += p[l + 16]`, then 8, 4, 2, 1) and lane 0 is the result.
pub(crate) fn dot(a: &[u8], b: &[u8], dtype: DType) -> f32 {
    with_reducible!(dtype, T, {
        let a: &[T] = bytemuck::cast_slice(a);
        let b: &[T] = bytemuck::cast_slice(b);
        let mut lanes = [0f32; DOT_LANES];
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            let lane = &mut lanes[i % DOT_LANES];
            *lane = x.widen().mul_add(y.widen(), *lane);
        }
        let mut width = DOT_LANES / 2;
        while width > 0 {
            for l in 0..width {
                lanes[l] += lanes[l + width];
            }
            width /= 2;
        }
        lanes[0]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulate_rounds_once() {
        // 1 + 2^-9 + 2^-9 is exact in f32 but not in bf16: rounding after each add would lose it.
        let tiny = bf16::from_f32(2f32.powi(-9));
        let rows = [bf16::ONE, tiny, tiny];
        let mut acc = vec![0f32; 1];
        for r in &rows {
            accumulate(&mut acc, bytemuck::bytes_of(r), DType::BF16, None);
        }
        let mut out = [0u8; 2];
        store(&acc, &mut out, DType::BF16);
        assert_eq!(
            bytemuck::cast::<[u8; 2], bf16>(out),
            bf16::from_f32(1.0 + 2f32.powi(-8))
        );
    }

    #[test]
    fn weighted_accumulate_is_fused() {
        let v = 1.0f32 + 2f32.powi(-12); // v*v = 1 + 2^-11 + 2^-24: the last bit survives only when fused
        let mut acc = vec![-1.0f32];
        accumulate(&mut acc, bytemuck::bytes_of(&v), DType::F32, Some(v));
        assert_eq!(acc[0], v.mul_add(v, -1.0));
        assert_ne!(acc[0], v * v - 1.0);
    }

    #[test]
    fn dot_and_scale() {
        let a = [1.0f32, 2.0, 3.0];
        let b = [4.0f32, 5.0, 6.0];
        assert_eq!(
            dot(
                bytemuck::cast_slice(&a),
                bytemuck::cast_slice(&b),
                DType::F32
            ),
            32.0
        );
        let mut out = [0u8; 12];
        scale(0.5, bytemuck::cast_slice(&a), &mut out, DType::F32);
        assert_eq!(bytemuck::cast::<[u8; 12], [f32; 3]>(out), [0.5, 1.0, 1.5]);
    }
}
