//! Element types that travel through dispatch and combine.

use half::{bf16, f16};
use std::fmt;

/// Element type of a tensor. `Fp8E4M3` is carried as raw bytes: dispatch moves it bit for bit and
/// never does arithmetic on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
    Fp8E4M3,
    I32,
    I64,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::Fp8E4M3 => 1,
            DType::I64 => 8,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::F32 => "f32",
            DType::Fp8E4M3 => "fp8_e4m3",
            DType::I32 => "i32",
            DType::I64 => "i64",
        }
    }

    /// Types a token payload may have (dispatch input `x`).
    pub const fn is_payload(self) -> bool {
        matches!(self, DType::BF16 | DType::F16 | DType::F32 | DType::Fp8E4M3)
    }

    /// Types combine can reduce (accumulated in f32, rounded once).
    pub const fn is_reducible(self) -> bool {
        matches!(self, DType::BF16 | DType::F16 | DType::F32)
    }

    /// Parses the names printed by [`DType::name`] (and a few common aliases).
    pub fn parse(name: &str) -> Option<DType> {
        Some(match name.to_ascii_lowercase().as_str() {
            "bf16" | "bfloat16" => DType::BF16,
            "f16" | "fp16" | "float16" | "half" => DType::F16,
            "f32" | "fp32" | "float32" | "float" => DType::F32,
            "fp8" | "fp8_e4m3" | "e4m3" | "float8_e4m3fn" => DType::Fp8E4M3,
            "i32" | "int32" => DType::I32,
            "i64" | "int64" => DType::I64,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rust element types with a fixed [`DType`]. Raw fp8 bytes are passed as `u8` through
/// [`crate::TensorRef::from_bytes`], since `u8` alone does not say which 8-bit format it is.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
