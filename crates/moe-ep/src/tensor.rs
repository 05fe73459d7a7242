//! A small typed tensor view over memory the caller owns ([`TensorRef`]), and the owned tensors the
//! library returns ([`Tensor`]). Both are row-major and contiguous.

use crate::dtype::{DType, Element};
use crate::error::{EpError, Result};
use crate::ffi::cuda_memory::StreamBuffer;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

/// Where a tensor's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Host,
    Cuda(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Host => f.write_str("host"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

const MAX_DIMS: usize = 4;

/// A shape of up to four dimensions; `Copy` so views stay cheap to pass around.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; MAX_DIMS],
    ndim: u8,
}

impl Shape {
    pub fn new(dims: &[usize]) -> Result<Self> {
        if dims.len() > MAX_DIMS {
            return Err(EpError::Shape {
                arg: "shape",
                expected: format!("at most {MAX_DIMS} dimensions"),
                actual: format!("{} dimensions", dims.len()),
            });
        }
        let mut d = [0; MAX_DIMS];
        d[..dims.len()].copy_from_slice(dims);
        Ok(Shape {
            dims: d,
            ndim: dims.len() as u8,
        })
    }

    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.ndim as usize]
    }

    pub fn ndim(&self) -> usize {
        self.ndim as usize
    }

    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }

    /// Size of dimension 0 (1 for a scalar).
    pub fn rows(&self) -> usize {
        self.dims().first().copied().unwrap_or(1)
    }

    /// Elements per row: the product of every dimension after the first.
    pub fn row_len(&self) -> usize {
        self.dims().iter().skip(1).product()
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.dims().iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Clone, Copy)]
enum ViewData<'a> {
    Host(&'a [u8]),
    /// A device address; never dereferenced on the host.
    Cuda {
        ptr: u64,
        ordinal: u32,
        _life: PhantomData<&'a [u8]>,
    },
}

/// A borrowed, typed, contiguous row-major view of memory the caller owns (a `Vec`, a candle or
/// PyTorch tensor). No copy is made when building one.
#[derive(Clone, Copy)]
pub struct TensorRef<'a> {
    data: ViewData<'a>,
    shape: Shape,
    dtype: DType,
}

fn check_len(arg: &'static str, shape: &Shape, dtype: DType, len_bytes: usize) -> Result<()> {
    let need = shape.numel() * dtype.size();
    if need != len_bytes {
        return Err(EpError::Shape {
            arg,
            expected: format!("{shape} {dtype} ({need} bytes)"),
            actual: format!("{len_bytes} bytes of data"),
        });
    }
    Ok(())
}

impl<'a> TensorRef<'a> {
    /// A view of a typed host slice; `shape`'s element count must equal `data.len()`.
    pub fn new<T: Element>(data: &'a [T], shape: &[usize]) -> Result<Self> {
        Self::from_bytes(bytemuck::cast_slice(data), shape, T::DTYPE)
    }

    /// A view of raw host bytes holding `dtype` elements (the way to pass fp8).
    pub fn from_bytes(bytes: &'a [u8], shape: &[usize], dtype: DType) -> Result<Self> {
        let shape = Shape::new(shape)?;
        check_len("data", &shape, dtype, bytes.len())?;
        Ok(TensorRef {
            data: ViewData::Host(bytes),
            shape,
            dtype,
        })
    }

    /// A view of device memory, for the GPU backends.
    ///
    /// # Safety
    /// `ptr` must be the address of at least `numel(shape) * dtype.size()` bytes of memory on CUDA
    /// device `ordinal`, readable and writable for the whole lifetime `'a` by the backend that the
    /// view is passed to.
    pub unsafe fn from_device_ptr(
        ptr: u64,
        ordinal: u32,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Self> {
        Ok(TensorRef {
            data: ViewData::Cuda {
                ptr,
                ordinal,
                _life: PhantomData,
            },
            shape: Shape::new(shape)?,
            dtype,
        })
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    pub fn dims(&self) -> &[usize] {
        // `Shape` is Copy and lives in self; borrow through a reference to self's field.
        self.shape.dims()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        match self.data {
            ViewData::Host(_) => Device::Host,
            ViewData::Cuda { ordinal, .. } => Device::Cuda(ordinal),
        }
    }

    /// The device address of a CUDA view (`None` for host memory).
    pub fn device_ptr(&self) -> Option<u64> {
        match self.data {
            ViewData::Host(_) => None,
            ViewData::Cuda { ptr, .. } => Some(ptr),
        }
    }

    /// The bytes of a host view; `arg` names the argument in the error for device memory.
    pub fn host_bytes(&self, arg: &'static str) -> Result<&'a [u8]> {
        match self.data {
            ViewData::Host(b) => Ok(b),
            ViewData::Cuda { ordinal, .. } => Err(EpError::Device {
                arg,
                expected: Device::Host.to_string(),
                actual: Device::Cuda(ordinal).to_string(),
            }),
        }
    }

    /// The elements of a host view as `T`, checking dtype, device and alignment.
    pub fn host_slice<T: Element>(&self, arg: &'static str) -> Result<&'a [T]> {
        if self.dtype != T::DTYPE {
            return Err(EpError::DType {
                arg,
                expected: T::DTYPE.to_string(),
                actual: self.dtype.to_string(),
            });
        }
        let bytes = self.host_bytes(arg)?;
        bytemuck::try_cast_slice(bytes).map_err(|_| EpError::Alignment {
            arg,
            expected: std::mem::align_of::<T>(),
            actual: bytes.as_ptr() as usize,
        })
    }
}

impl fmt::Debug for TensorRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TensorRef({} {} on {})",
            self.shape,
            self.dtype,
            self.device()
        )
    }
}

/// Host storage aligned to 8 bytes, so it can be viewed as any [`Element`] type.
#[derive(Clone)]
struct HostBuffer {
    words: Vec<u64>,
    len_bytes: usize,
}

impl HostBuffer {
    /// Zero-filled. Large buffers come from the allocator's zeroed pages, so rows that are never
    /// written (the unused tail of a worst-case receive buffer) cost no memory traffic.
    fn zeroed(len_bytes: usize) -> Self {
        HostBuffer {
            words: vec![0u64; len_bytes.div_ceil(8)],
            len_bytes,
        }
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len_bytes]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len_bytes]
    }
}

#[derive(Clone)]
enum Storage {
    Host(HostBuffer),
    /// Device memory of the CUDA backend, shared by the tensors cut from one allocation.
    Cuda(Arc<StreamBuffer>),
}

/// A tensor owned by the library: dispatch and combine outputs.
#[derive(Clone)]
pub struct Tensor {
    storage: Storage,
    shape: Shape,
    dtype: DType,
}

impl Tensor {
    /// A zero-filled host tensor.
    pub fn zeros(shape: &[usize], dtype: DType) -> Result<Self> {
        let shape = Shape::new(shape)?;
        Ok(Tensor {
            storage: Storage::Host(HostBuffer::zeroed(shape.numel() * dtype.size())),
            shape,
            dtype,
        })
    }

    /// A host tensor holding a copy of `data`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Self> {
        let mut t = Tensor::zeros(shape, T::DTYPE)?;
        check_len("data", &t.shape, T::DTYPE, std::mem::size_of_val(data))?;
        t.host_bytes_mut()
            .copy_from_slice(bytemuck::cast_slice(data));
        Ok(t)
    }

    /// A host tensor holding a copy of raw bytes of `dtype` elements.
    pub fn from_bytes(bytes: &[u8], shape: &[usize], dtype: DType) -> Result<Self> {
        let mut t = Tensor::zeros(shape, dtype)?;
        check_len("data", &t.shape, dtype, bytes.len())?;
        t.host_bytes_mut().copy_from_slice(bytes);
        Ok(t)
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }

    pub fn rows(&self) -> usize {
        self.shape.rows()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Host,
            Storage::Cuda(b) => Device::Cuda(b.ordinal()),
        }
    }

    /// A device tensor over `buffer`, which holds at least the shape's bytes.
    pub(crate) fn on_device(buffer: StreamBuffer, shape: &[usize], dtype: DType) -> Result<Self> {
        let shape = Shape::new(shape)?;
        let need = shape.numel() * dtype.size();
        assert!(
            buffer.bytes() >= need,
            "device buffer of {} bytes for {need}",
            buffer.bytes()
        );
        Ok(Tensor {
            storage: Storage::Cuda(Arc::new(buffer)),
            shape,
            dtype,
        })
    }

    /// The device address of a CUDA tensor (`None` on the host).
    pub fn device_ptr(&self) -> Option<u64> {
        match &self.storage {
            Storage::Host(_) => None,
            Storage::Cuda(b) => Some(b.ptr()),
        }
    }

    /// A host copy (waits for the device's queued work); a host tensor is cloned.
    pub fn to_host(&self) -> Result<Tensor> {
        match &self.storage {
            Storage::Host(_) => Ok(self.clone()),
            Storage::Cuda(b) => {
                let mut t = Tensor::zeros(self.shape.dims(), self.dtype)?;
                b.read(t.host_bytes_mut())
                    .map_err(|reason| EpError::BackendUnavailable {
                        backend: "cuda",
                        reason,
                    })?;
                Ok(t)
            }
        }
    }

    /// Overwrites this tensor with `src` (same shape and dtype): host to host, host to device
    /// (waits for the copy), or device to device on this tensor's stream (asynchronous, so it can
    /// be recorded into a graph; `src` must stay alive until the stream has run it).
    pub fn copy_from(&mut self, src: TensorRef<'_>) -> Result<()> {
        if src.dims() != self.dims() || src.dtype() != self.dtype {
            return Err(EpError::Shape {
                arg: "src",
                expected: format!("{} {}", self.shape, self.dtype),
                actual: format!("{} {}", src.shape(), src.dtype()),
            });
        }
        let bytes = self.shape.numel() * self.dtype.size();
        let device_err = |reason| EpError::BackendUnavailable {
            backend: "cuda",
            reason,
        };
        match (&mut self.storage, src.device()) {
            (Storage::Host(b), Device::Host) => {
                b.bytes_mut().copy_from_slice(src.host_bytes("src")?);
                Ok(())
            }
            (Storage::Cuda(b), Device::Host) => b.write(src.host_bytes("src")?).map_err(device_err),
            (Storage::Cuda(b), Device::Cuda(o)) if o == b.ordinal() => b
                .copy_from_device(src.device_ptr().expect("a cuda view"), bytes)
                .map_err(device_err),
            (storage, from) => Err(EpError::Device {
                arg: "src",
                expected: match storage {
                    Storage::Host(_) => Device::Host.to_string(),
                    Storage::Cuda(b) => format!("host or cuda:{}", b.ordinal()),
                },
                actual: from.to_string(),
            }),
        }
    }

    /// Keeps the first `rows` rows (exact-size outputs cut from a capacity-sized buffer).
    pub(crate) fn truncate_rows(&mut self, rows: usize) -> Result<()> {
        let mut dims = self.shape.dims().to_vec();
        if let Some(first) = dims.first_mut() {
            *first = rows.min(*first);
        }
        self.shape = Shape::new(&dims)?;
        if let Storage::Host(b) = &mut self.storage {
            b.len_bytes = self.shape.numel() * self.dtype.size();
        }
        Ok(())
    }

    /// A borrowed view, to pass this tensor back into the library (e.g. as combine's `y`).
    pub fn view(&self) -> TensorRef<'_> {
        let data = match &self.storage {
            Storage::Host(b) => ViewData::Host(b.bytes()),
            Storage::Cuda(b) => ViewData::Cuda {
                ptr: b.ptr(),
                ordinal: b.ordinal(),
                _life: PhantomData,
            },
        };
        TensorRef {
            data,
            shape: self.shape,
            dtype: self.dtype,
        }
    }

    /// A view of the first `rows` rows (e.g. the valid rows of a worst-case receive buffer).
    pub fn view_rows(&self, rows: usize) -> Result<TensorRef<'_>> {
        if rows > self.rows() {
            return Err(EpError::Shape {
                arg: "rows",
                expected: format!("at most {} rows", self.rows()),
                actual: format!("{rows} rows"),
            });
        }
        let mut dims = [0usize; MAX_DIMS];
        dims[..self.shape.ndim()].copy_from_slice(self.shape.dims());
        dims[0] = rows;
        let shape = Shape::new(&dims[..self.shape.ndim()])?;
        let len = shape.numel() * self.dtype.size();
        let data = match self.view().data {
            ViewData::Host(bytes) => ViewData::Host(&bytes[..len]),
            cuda => cuda,
        };
        Ok(TensorRef {
            data,
            shape,
            dtype: self.dtype,
        })
    }

    /// The bytes of a host tensor.
    ///
    /// # Panics
    /// On a device tensor: read it with [`Tensor::to_host`] first.
    pub fn host_bytes(&self) -> &[u8] {
        match &self.storage {
            Storage::Host(b) => b.bytes(),
            Storage::Cuda(b) => panic!("tensor is on cuda:{}; call to_host() first", b.ordinal()),
        }
    }

    /// The bytes of a host tensor, writable.
    ///
    /// # Panics
    /// On a device tensor.
    pub fn host_bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.storage {
            Storage::Host(b) => b.bytes_mut(),
            Storage::Cuda(b) => panic!("tensor is on cuda:{}; call to_host() first", b.ordinal()),
        }
    }

    /// The elements as `T`; errors when `T` is not this tensor's dtype or the tensor is on a device.
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_dtype::<T>()?;
        self.check_host()?;
        Ok(bytemuck::cast_slice(self.host_bytes()))
    }

    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_dtype::<T>()?;
        self.check_host()?;
        Ok(bytemuck::cast_slice_mut(self.host_bytes_mut()))
    }

    fn check_host(&self) -> Result<()> {
        match self.device() {
            Device::Host => Ok(()),
            other => Err(EpError::Device {
                arg: "tensor",
                expected: "host (call to_host() first)".into(),
                actual: other.to_string(),
            }),
        }
    }

    /// A copy of the elements as a `Vec<T>`.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        Ok(self.as_slice::<T>()?.to_vec())
    }

    fn check_dtype<T: Element>(&self) -> Result<()> {
        if self.dtype != T::DTYPE {
            return Err(EpError::DType {
                arg: "tensor",
                expected: T::DTYPE.to_string(),
                actual: self.dtype.to_string(),
            });
        }
        Ok(())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({} {} on {})",
            self.shape,
            self.dtype,
            self.device()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_checks_length_and_dtype() {
        let v = vec![1.0f32; 6];
        let t = TensorRef::new(&v, &[2, 3]).unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        assert_eq!(t.host_slice::<f32>("x").unwrap().len(), 6);
        assert!(matches!(
            t.host_slice::<i32>("x"),
            Err(EpError::DType { arg: "x", .. })
        ));
        assert!(matches!(
            TensorRef::new(&v, &[4, 2]),
            Err(EpError::Shape { arg: "data", .. })
        ));
    }

    #[test]
    fn owned_tensor_round_trips() {
        let t = Tensor::from_slice(&[1i32, 2, 3, 4], &[2, 2]).unwrap();
        assert_eq!(t.to_vec::<i32>().unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(
            t.view_rows(1).unwrap().host_slice::<i32>("y").unwrap(),
            &[1, 2]
        );
        assert!(t.view_rows(3).is_err());
    }
}
