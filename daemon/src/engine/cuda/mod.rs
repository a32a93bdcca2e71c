//! The CUDA backend: a [`Stack`] trained on one GPU.
//!
//! The data layout is the CPU engine's, so the same model-batched design
//! carries over: every dense layer of all K models is one cuBLAS strided
//! batched product (batch = model), element-wise ops, norms, dropout, losses
//! and optimiser steps are kernels over `[n × K·w]` matrices, compiled at
//! run time by NVRTC from `kernels.cu` for the GPU's own architecture (no
//! nvcc at build time). Parameters, optimiser moments and activations stay
//! on the GPU; each step uploads its minibatch and nothing else.
//!
//! cudarc loads the CUDA libraries when first called and panics when one is
//! missing, and creating a context without a driver panics too: every
//! library is probed first, and a machine without them gets
//! [`CudaError::NoGpu`] or [`CudaError::Library`], never a panic.
//!
//! All kernels sum in a fixed order without atomics, and cuBLAS repeats its
//! results on one GPU model, so a run repeats bit for bit on the same GPU. It
//! agrees with the CPU engine to rounding, not bit for bit.

use std::ffi::{c_char, CStr, CString};
use std::sync::{Arc, Mutex};

use cerebro_shared::spec::Optimizer;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::activation::Activation;
use super::backend::{BackendError, StackTrainer};
use super::loss::{Head, Loss};
use super::optim::ModelStep;
use super::stack::{Arch, Batch, Op, Slot, Stack, BATCH_NORM_MOMENTUM};
use super::trainer::{BatchSource, MiniBatch};

/// The kernels' source, compiled by NVRTC when a GPU is first used.
pub const KERNELS: &str = include_str!("kernels.cu");

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("no GPU: {0}")]
    NoGpu(String),
    #[error("the CUDA library {0} was not found; install it, or add its directory to LD_LIBRARY_PATH")]
    Library(&'static str),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    #[error("NVRTC cannot compile the engine's kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error("{0} have no GPU kernels yet: they train on the CPU engine (cerebrod's device = cpu, or auto)")]
    Unsupported(&'static str),
}

/// Checks that the driver, cuBLAS and NVRTC libraries can be loaded and
/// that GPU `ordinal` exists.
fn probe(ordinal: usize) -> Result<(), CudaError> {
    // SAFETY: each call only tries to load a shared library.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(CudaError::NoGpu("no CUDA driver installed".into()));
        }
        let count = CudaContext::device_count().map_err(|e| CudaError::NoGpu(e.to_string()))?.max(0) as usize;
        if ordinal >= count {
            return Err(CudaError::NoGpu(format!("GPU {ordinal} does not exist; the driver reports {count}")));
        }
        if !cudarc::cublas::sys::is_culib_present() {
            return Err(CudaError::Library("libcublas"));
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(CudaError::Library("libnvrtc"));
        }
    }
    Ok(())
}

/// Whether NVRTC can be loaded (it can compile without a GPU).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to load the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles [`KERNELS`] to a cubin for `arch` (e.g. `sm_90`). A cubin, not
/// PTX: PTX from an NVRTC newer than the driver would not load.
pub fn compile(arch: &str) -> Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::{result, sys};
    let failed = |log: String| CudaError::Compile { arch: arch.to_string(), log };
    let source = CString::new(KERNELS).expect("the kernel source has no NUL");
    let program = result::create_program(&source, None).map_err(|e| failed(e.to_string()))?;
    let options = [format!("--gpu-architecture={arch}"), "--std=c++14".to_string()];
    // SAFETY: `program` is live until destroyed at the end; the buffers are
    // sized by NVRTC's own size calls.
    unsafe {
        let outcome = result::compile_program(program, &options).map_err(|e| {
            let log = result::get_program_log(program).unwrap_or_default();
            let text = CStr::from_ptr(log.as_ptr()).to_string_lossy().trim().to_string();
            failed(if text.is_empty() { e.to_string() } else { text })
        });
        let cubin = outcome.and_then(|()| {
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(program, &mut size).result().map_err(|e| failed(e.to_string()))?;
            let mut cubin = vec![0u8; size];
            sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr() as *mut c_char)
                .result()
                .map_err(|e| failed(e.to_string()))?;
            Ok(cubin)
        });
        let _ = result::destroy_program(program);
        cubin
    }
}

/// One GPU with the engine's kernels loaded; shared by the jobs that use it.
struct Gpu {
    context: Arc<CudaContext>,
    name: String,
    kernels: Kernels,
}

macro_rules! kernels {
    ($($name:ident),* $(,)?) => {
        struct Kernels { $($name: CudaFunction),* }
        impl Kernels {
            #[cfg(test)]
            const NAMES: &[&str] = &[$(stringify!($name)),*];

            fn load(module: &Arc<cudarc::driver::CudaModule>) -> Result<Kernels, CudaError> {
                Ok(Kernels { $($name: module.load_function(stringify!($name))?),* })
            }
        }
    };
}

kernels!(
    activation_forward,
    activation_backward,
    add_bias,
    add,
    add_into,
    multiply_into,
    column_sums,
    layer_norm_forward,
    norm_parameter_grads,
    layer_norm_backward,
    batch_norm_forward,
    batch_norm_backward,
    batch_norm_eval,
    batch_norm_running,
    dropout_forward,
    gather_embedding,
    scatter_embedding,
    binary_loss,
    multiclass_loss,
    regression_loss,
    sum_losses,
    squared_norms,
    optimizer_step,
);

/// GPUs opened so far, by ordinal: compiling and loading happens once.
static GPUS: Mutex<Vec<(usize, Arc<Gpu>)>> = Mutex::new(Vec::new());

fn open(ordinal: usize) -> Result<Arc<Gpu>, CudaError> {
    let mut gpus = GPUS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, gpu)) = gpus.iter().find(|(o, _)| *o == ordinal) {
        return Ok(gpu.clone());
    }
    probe(ordinal)?;
    let context = CudaContext::new(ordinal)?;
    // One stream per trainer and raw pointers between its calls: the
    // stream orders everything, so cudarc's per-buffer events are not needed.
    // SAFETY: no buffer of this context is shared between streams.
    unsafe { context.disable_event_tracking() };
    let (major, minor) = context.compute_capability()?;
    let cubin = compile(&format!("sm_{major}{minor}"))?;
    let module = context.load_module(Ptx::from_binary(cubin))?;
    let gpu = Arc::new(Gpu {
        name: format!("cuda:{ordinal} {}", context.name().unwrap_or_else(|_| "GPU".into())),
        kernels: Kernels::load(&module)?,
        context,
    });
    gpus.push((ordinal, gpu.clone()));
    Ok(gpu)
}

/// A device buffer that grows to the largest length asked of it.
struct Buffer<T> {
    slice: Option<CudaSlice<T>>,
    ptr: u64,
    capacity: usize,
}

impl<T> Default for Buffer<T> {
    fn default() -> Self {
        Buffer { slice: None, ptr: 0, capacity: 0 }
    }
}

impl<T: DeviceRepr + ValidAsZeroBits> Buffer<T> {
    fn zeroed(stream: &Arc<CudaStream>, len: usize) -> Result<Buffer<T>, CudaError> {
        let mut b = Buffer::default();
        b.ensure(stream, len)?;
        Ok(b)
    }

    fn from_host(stream: &Arc<CudaStream>, data: &[T]) -> Result<Buffer<T>, CudaError> {
        let mut b = Buffer::zeroed(stream, data.len())?;
        b.upload(stream, data)?;
        Ok(b)
    }

    /// The buffer's address, after growing it (zeroed) to `len` if needed.
    fn ensure(&mut self, stream: &Arc<CudaStream>, len: usize) -> Result<u64, CudaError> {
        if self.slice.is_none() || len > self.capacity {
            let slice = stream.alloc_zeros::<T>(len.max(1))?;
            self.ptr = slice.device_ptr(stream).0;
            self.capacity = len.max(1);
            self.slice = Some(slice);
        }
        Ok(self.ptr)
    }

    fn upload(&mut self, stream: &Arc<CudaStream>, data: &[T]) -> Result<u64, CudaError> {
        let ptr = self.ensure(stream, data.len())?;
        if !data.is_empty() {
            let slice = self.slice.as_mut().expect("ensured");
            stream.memcpy_htod(data, &mut slice.slice_mut(..data.len()))?;
        }
        Ok(ptr)
    }

    fn download(&self, stream: &Arc<CudaStream>, len: usize) -> Result<Vec<T>, CudaError> {
        match &self.slice {
            Some(slice) if len > 0 => {
                let host = stream.clone_dtoh(&slice.slice(..len))?;
                stream.synchronize()?;
                Ok(host)
            }
            _ => Ok(Vec::new()),
        }
    }
}

/// A kernel argument, kept alive until the launch has read it.
#[derive(Clone, Copy)]
enum Arg {
    Ptr(u64),
    Int(i32),
    Long(i64),
    Word(u64),
    Float(f32),
    Double(f64),
}

const BLOCK: u32 = 256;

/// Enough blocks of [`BLOCK`] threads for `work` items, capped (kernels loop).
fn grid(work: usize) -> LaunchConfig {
    let blocks = work.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One operand of a row-major product: `trans` means the stored matrix is
/// the transpose of the one multiplied. `stride` is between models.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    ld: usize,
    stride: usize,
    trans: bool,
}

fn operand(ptr: u64, ld: usize, stride: usize, trans: bool) -> Operand {
    Operand { ptr, ld, stride, trans }
}

/// Byte address of element `offset` of an f32 buffer.
fn at(ptr: u64, offset: usize) -> u64 {
    ptr + (offset * std::mem::size_of::<f32>()) as u64
}

/// Settings uploaded per model per step (kernels.cu's SETTINGS).
const SETTINGS: usize = 8;

/// Trains a stack of K models on one GPU.
pub struct CudaTrainer {
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: usize,
    arch: Arch,
    seed: u64,
    slots: Vec<Slot>,
    loss: Loss,
    optimizer: Optimizer,
    /// Steps taken (seeds dropout), and each model's own (Adam's corrections).
    steps: u64,
    model_steps: Vec<i32>,
    params: Vec<Buffer<f32>>,
    grads: Vec<Buffer<f32>>,
    first: Vec<Buffer<f32>>,
    second: Vec<Buffer<f32>>,
    /// BatchNorm running means and variances.
    state: Vec<Buffer<f32>>,
    class_weights: Buffer<f32>,
    x: Buffer<f32>,
    codes: Buffer<u32>,
    y: Buffer<f32>,
    emb: Buffer<f32>,
    d_emb: Buffer<f32>,
    /// Each op's output, `[n × K·w]`; `source[i]` is the buffer holding op
    /// i's output (scoring skips dropout without a copy).
    outs: Vec<Buffer<f32>>,
    source: Vec<usize>,
    /// Normalised values or dropout masks, and norm statistics, per op.
    aux: Vec<Buffer<f32>>,
    stats: Vec<Buffer<f32>>,
    delta: Buffer<f32>,
    delta_prev: Buffer<f32>,
    /// Gradient reaching an op's output through a residual connection.
    pending: Vec<(Buffer<f32>, bool)>,
    row_loss: Buffer<f32>,
    loss_sums: Buffer<f64>,
    norms: Buffer<f64>,
    settings: Buffer<f32>,
    active: Buffer<f32>,
}

impl CudaTrainer {
    /// Moves `stack` onto GPU `ordinal`.
    pub fn new(stack: Stack, loss: Loss, optimizer: Optimizer, ordinal: usize) -> Result<CudaTrainer, CudaError> {
        if stack.arch.periodic.is_some() {
            return Err(CudaError::Unsupported("periodic numeric embeddings (numeric_encoding = \"periodic\")"));
        }
        let gpu = open(ordinal)?;
        let stream = gpu.context.new_stream()?;
        let blas = CudaBlas::new(stream.clone())?;
        let slots = stack.arch.slots();
        let upload_all = |tensors: &[Vec<f32>]| -> Result<Vec<Buffer<f32>>, CudaError> {
            tensors.iter().map(|t| Buffer::from_host(&stream, t)).collect()
        };
        let zeros = || -> Result<Vec<Buffer<f32>>, CudaError> {
            stack.params.iter().map(|t| Buffer::zeroed(&stream, t.len())).collect()
        };
        let ops = stack.arch.ops.len();
        Ok(CudaTrainer {
            params: upload_all(&stack.params)?,
            state: upload_all(&stack.state)?,
            grads: zeros()?,
            first: zeros()?,
            second: zeros()?,
            class_weights: Buffer::from_host(&stream, &loss.class_weights)?,
            loss_sums: Buffer::zeroed(&stream, stack.k)?,
            norms: Buffer::zeroed(&stream, stack.k)?,
            settings: Buffer::zeroed(&stream, stack.k * SETTINGS)?,
            active: Buffer::zeroed(&stream, stack.k)?,
            outs: (0..ops).map(|_| Buffer::default()).collect(),
            aux: (0..ops).map(|_| Buffer::default()).collect(),
            stats: (0..ops).map(|_| Buffer::default()).collect(),
            pending: (0..ops).map(|_| (Buffer::default(), false)).collect(),
            source: Vec::with_capacity(ops),
            x: Buffer::default(),
            codes: Buffer::default(),
            y: Buffer::default(),
            emb: Buffer::default(),
            d_emb: Buffer::default(),
            delta: Buffer::default(),
            delta_prev: Buffer::default(),
            row_loss: Buffer::default(),
            model_steps: vec![0; stack.k],
            steps: 0,
            k: stack.k,
            seed: stack.seed,
            arch: stack.arch,
            slots,
            loss,
            optimizer,
            gpu,
            stream,
            blas,
        })
    }

    fn launch(&self, kernel: &CudaFunction, config: LaunchConfig, args: &[Arg]) -> Result<(), CudaError> {
        let mut builder = self.stream.launch_builder(kernel);
        for arg in args {
            match arg {
                Arg::Ptr(v) | Arg::Word(v) => builder.arg(v),
                Arg::Int(v) => builder.arg(v),
                Arg::Long(v) => builder.arg(v),
                Arg::Float(v) => builder.arg(v),
                Arg::Double(v) => builder.arg(v),
            };
        }
        // SAFETY: every kernel's parameters are listed in kernels.cu in this
        // order and with these widths; the buffers are sized by the callers.
        unsafe { builder.launch(config) }?;
        Ok(())
    }

    /// Row-major `C[m×n] = op(A)[m×k] · op(B)[k×n] + beta·C`, once per model.
    /// cuBLAS is column-major, so it computes `Cᵀ = op(B)ᵀ · op(A)ᵀ`.
    fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
    ) -> Result<(), CudaError> {
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let alpha = 1.0f32;
        // SAFETY: the operands are device buffers at least as large as the
        // shapes and strides given; cuBLAS runs on this trainer's stream.
        unsafe {
            cudarc::cublas::result::sgemm_strided_batched(
                *self.blas.handle(),
                op(b.trans),
                op(a.trans),
                n as i32,
                m as i32,
                k as i32,
                &alpha,
                b.ptr as *const f32,
                b.ld.max(1) as i32,
                b.stride as i64,
                a.ptr as *const f32,
                a.ld.max(1) as i32,
                a.stride as i64,
                &beta,
                c.ptr as *mut f32,
                c.ld.max(1) as i32,
                c.stride as i64,
                self.k as i32,
            )?;
        }
        Ok(())
    }

    fn upload_batch(&mut self, batch: Batch<'_>) -> Result<(), CudaError> {
        self.x.upload(&self.stream, batch.x)?;
        self.codes.upload(&self.stream, batch.codes)?;
        Ok(())
    }

    /// Op `i`'s input buffer.
    fn input_of(&self, i: usize) -> u64 {
        if i == 0 {
            self.x.ptr
        } else {
            self.outs[self.source[i - 1]].ptr
        }
    }

    /// A forward pass over the uploaded `n` rows; `step` is the training
    /// step (None when scoring). The logits end in `outs[source.last()]`.
    fn forward(&mut self, n: usize, step: Option<u64>) -> Result<(), CudaError> {
        let (k, s) = (self.k, self.stream.clone());
        let arch = self.arch.clone();
        let kern = &self.gpu.kernels;
        let (p, e) = (arch.inputs, arch.embedded_width());
        self.source.clear();
        if e > 0 {
            self.emb.ensure(&s, n * k * e)?;
            let mut offset = 0;
            for (c, spec) in arch.embeddings.iter().enumerate() {
                let args = [
                    Arg::Ptr(self.params[c].ptr),
                    Arg::Ptr(self.codes.ptr),
                    Arg::Ptr(self.emb.ptr),
                    Arg::Long(n as i64),
                    Arg::Int(k as i32),
                    Arg::Int(arch.embeddings.len() as i32),
                    Arg::Int(c as i32),
                    Arg::Int(spec.vocabulary as i32),
                    Arg::Int(spec.dim as i32),
                    Arg::Int(e as i32),
                    Arg::Int(offset as i32),
                ];
                self.launch(&kern.gather_embedding, grid(n * k * spec.dim), &args)?;
                offset += spec.dim;
            }
        }
        for (i, op) in arch.ops.iter().enumerate() {
            let input = self.input_of(i);
            let (slot, state) = (arch.slot_of(i), arch.state_of(i));
            let wide_in = k * arch.width_before(i);
            let width = arch.width_after(i);
            let wide = k * width;
            let len = n * wide;
            if matches!(op, Op::Dropout { .. }) && step.is_none() {
                self.source.push(self.source[i - 1]);
                continue;
            }
            let out = self.outs[i].ensure(&s, len)?;
            self.source.push(i);
            match *op {
                Op::Dense { inputs, outputs } => {
                    let (w, b) = (self.params[slot].ptr, self.params[slot + 1].ptr);
                    let dst = operand(out, wide, outputs, false);
                    if i == 0 {
                        let fan_in = p + e;
                        let weights = operand(w, fan_in, outputs * fan_in, true);
                        if p > 0 {
                            self.gemm((n, outputs, p), operand(self.x.ptr, p, 0, false), weights, 0.0, dst)?;
                        } else {
                            s.memset_zeros(&mut self.outs[i].slice.as_mut().expect("ensured").slice_mut(..len))?;
                        }
                        if e > 0 {
                            let emb = operand(self.emb.ptr, k * e, e, false);
                            self.gemm(
                                (n, outputs, e),
                                emb,
                                operand(at(w, p), fan_in, outputs * fan_in, true),
                                1.0,
                                dst,
                            )?;
                        }
                    } else {
                        let x = operand(input, wide_in, inputs, false);
                        self.gemm((n, outputs, inputs), x, operand(w, inputs, outputs * inputs, true), 0.0, dst)?;
                    }
                    let args = [Arg::Ptr(out), Arg::Ptr(b), Arg::Long(n as i64), Arg::Long(wide as i64)];
                    self.launch(&kern.add_bias, grid(len), &args)?;
                }
                Op::Activation { f } => {
                    let args = [Arg::Int(activation_code(f)), Arg::Ptr(input), Arg::Ptr(out), Arg::Long(len as i64)];
                    self.launch(&kern.activation_forward, grid(len), &args)?;
                }
                Op::LayerNorm { width } => {
                    let xhat = self.aux[i].ensure(&s, len)?;
                    let inv = self.stats[i].ensure(&s, n * k)?;
                    let (gain, shift) = (self.params[slot].ptr, self.params[slot + 1].ptr);
                    let args = [
                        Arg::Ptr(input),
                        Arg::Ptr(gain),
                        Arg::Ptr(shift),
                        Arg::Ptr(xhat),
                        Arg::Ptr(inv),
                        Arg::Ptr(out),
                        Arg::Long((n * k) as i64),
                        Arg::Int(width as i32),
                        Arg::Int(k as i32),
                    ];
                    self.launch(&kern.layer_norm_forward, grid(n * k), &args)?;
                }
                Op::BatchNorm { .. } => {
                    let (gain, shift) = (self.params[slot].ptr, self.params[slot + 1].ptr);
                    if step.is_some() {
                        let xhat = self.aux[i].ensure(&s, len)?;
                        let stats = self.stats[i].ensure(&s, 3 * wide)?;
                        let args = [
                            Arg::Ptr(input),
                            Arg::Ptr(gain),
                            Arg::Ptr(shift),
                            Arg::Ptr(xhat),
                            Arg::Ptr(stats),
                            Arg::Ptr(out),
                            Arg::Long(n as i64),
                            Arg::Long(wide as i64),
                        ];
                        self.launch(&kern.batch_norm_forward, grid(wide), &args)?;
                    } else {
                        let (mean, var) = (self.state[state].ptr, self.state[state + 1].ptr);
                        let args = [
                            Arg::Ptr(input),
                            Arg::Ptr(out),
                            Arg::Ptr(gain),
                            Arg::Ptr(shift),
                            Arg::Ptr(mean),
                            Arg::Ptr(var),
                            Arg::Long(n as i64),
                            Arg::Long(wide as i64),
                        ];
                        self.launch(&kern.batch_norm_eval, grid(len), &args)?;
                    }
                }
                Op::Dropout { p } => {
                    let mask = self.aux[i].ensure(&s, len)?;
                    let args = [
                        Arg::Ptr(input),
                        Arg::Ptr(out),
                        Arg::Ptr(mask),
                        Arg::Long(n as i64),
                        Arg::Int(width as i32),
                        Arg::Int(k as i32),
                        Arg::Word(self.seed),
                        Arg::Word(step.expect("scoring skips dropout")),
                        Arg::Word(i as u64),
                        Arg::Float(p),
                        Arg::Float(1.0 / (1.0 - p)),
                    ];
                    self.launch(&kern.dropout_forward, grid(n * width), &args)?;
                }
                Op::Residual { from } => {
                    let skip = self.outs[self.source[from - 1]].ptr;
                    let args = [Arg::Ptr(input), Arg::Ptr(skip), Arg::Ptr(out), Arg::Long(len as i64)];
                    self.launch(&kern.add, grid(len), &args)?;
                }
            }
        }
        Ok(())
    }

    fn logits(&self) -> u64 {
        self.outs[*self.source.last().expect("a network has ops")].ptr
    }

    /// The loss of every active model over the uploaded batch; its gradient
    /// goes to `delta` and each model's summed loss × rows to `loss_sums`.
    fn loss_and_grad(&mut self, n: usize, y: &[f32]) -> Result<(), CudaError> {
        let (k, s) = (self.k, self.stream.clone());
        let c = self.arch.outputs();
        let denominator = self.loss.denominator(&y[..n]);
        let inv = 1.0 / denominator;
        let y_ptr = self.y.upload(&s, &y[..n])?;
        let grad = self.delta.ensure(&s, n * k * c)?;
        let row_loss = self.row_loss.ensure(&s, n * k)?;
        let (logits, active) = (self.logits(), self.active.ptr);
        let kern = &self.gpu.kernels;
        let common = [Arg::Ptr(logits), Arg::Ptr(y_ptr), Arg::Ptr(grad), Arg::Ptr(row_loss), Arg::Ptr(active)];
        let rows = [Arg::Long(n as i64), Arg::Int(k as i32)];
        let weight = |class: usize| self.loss.class_weights.get(class).copied().unwrap_or(1.0);
        match self.loss.head {
            Head::Binary => {
                let smoothing = self.loss.label_smoothing;
                let extra = [Arg::Float(weight(0)), Arg::Float(weight(1)), Arg::Float(smoothing), Arg::Float(inv)];
                let args = [&common[..], &rows, &extra].concat();
                self.launch(&kern.binary_loss, grid(n * k), &args)?;
            }
            Head::Multiclass(classes) => {
                let weighted = !self.loss.class_weights.is_empty();
                let extra = [
                    Arg::Int(classes as i32),
                    Arg::Ptr(self.class_weights.ptr),
                    Arg::Int(weighted as i32),
                    Arg::Float(self.loss.label_smoothing),
                    Arg::Float(inv),
                ];
                self.launch(&kern.multiclass_loss, grid(n * k), &[&common[..], &rows, &extra].concat())?;
            }
            Head::Regression => {
                let extra = [Arg::Float(self.loss.huber_delta), Arg::Float(inv)];
                self.launch(&kern.regression_loss, grid(n * k), &[&common[..], &rows, &extra].concat())?;
            }
        }
        let args = [
            Arg::Ptr(row_loss),
            Arg::Ptr(self.loss_sums.ptr),
            Arg::Long(n as i64),
            Arg::Int(k as i32),
            Arg::Double(n as f64 / denominator as f64),
        ];
        self.launch(&kern.sum_losses, grid(k), &args)
    }

    /// Back-propagates `delta` through the last training forward pass,
    /// overwriting every gradient.
    fn backward(&mut self, n: usize) -> Result<(), CudaError> {
        let (k, s) = (self.k, self.stream.clone());
        let arch = self.arch.clone();
        for (_, set) in self.pending.iter_mut() {
            *set = false;
        }
        for i in (0..arch.ops.len()).rev() {
            let kern = &self.gpu.kernels;
            let (wide_in, wide_out) = (k * arch.width_before(i), k * arch.width_after(i));
            let len = n * wide_out;
            let delta = self.delta.ptr;
            if self.pending[i].1 {
                let args = [Arg::Ptr(delta), Arg::Ptr(self.pending[i].0.ptr), Arg::Long(len as i64)];
                self.launch(&kern.add_into, grid(len), &args)?;
                self.pending[i].1 = false;
            }
            let slot = arch.slot_of(i);
            let input = self.input_of(i);
            match arch.ops[i] {
                Op::Dense { inputs, outputs } => {
                    let (w, gw, gb) = (self.params[slot].ptr, self.grads[slot].ptr, self.grads[slot + 1].ptr);
                    let args = [Arg::Ptr(delta), Arg::Ptr(gb), Arg::Long(n as i64), Arg::Long(wide_out as i64)];
                    self.launch(&kern.column_sums, grid(wide_out), &args)?;
                    let d = operand(delta, wide_out, outputs, true);
                    if i == 0 {
                        return self.input_dense_backward(n, outputs, delta);
                    }
                    let into = operand(gw, inputs, outputs * inputs, false);
                    self.gemm((outputs, inputs, n), d, operand(input, wide_in, inputs, false), 0.0, into)?;
                    let prev = self.delta_prev.ensure(&s, n * wide_in)?;
                    let d = operand(delta, wide_out, outputs, false);
                    let w = operand(w, inputs, outputs * inputs, false);
                    self.gemm((n, inputs, outputs), d, w, 0.0, operand(prev, wide_in, inputs, false))?;
                    std::mem::swap(&mut self.delta, &mut self.delta_prev);
                }
                Op::Activation { f } => {
                    let args = [Arg::Int(activation_code(f)), Arg::Ptr(input), Arg::Ptr(delta), Arg::Long(len as i64)];
                    self.launch(&kern.activation_backward, grid(len), &args)?;
                }
                Op::LayerNorm { width } => {
                    let (xhat, inv) = (self.aux[i].ptr, self.stats[i].ptr);
                    self.norm_parameter_grads(n, wide_out, xhat, slot)?;
                    let args = [
                        Arg::Ptr(delta),
                        Arg::Ptr(self.params[slot].ptr),
                        Arg::Ptr(xhat),
                        Arg::Ptr(inv),
                        Arg::Long((n * k) as i64),
                        Arg::Int(width as i32),
                        Arg::Int(k as i32),
                    ];
                    self.launch(&self.gpu.kernels.layer_norm_backward, grid(n * k), &args)?;
                }
                Op::BatchNorm { .. } => {
                    let (xhat, stats) = (self.aux[i].ptr, self.stats[i].ptr);
                    self.norm_parameter_grads(n, wide_out, xhat, slot)?;
                    let args = [
                        Arg::Ptr(delta),
                        Arg::Ptr(self.params[slot].ptr),
                        Arg::Ptr(xhat),
                        Arg::Ptr(stats),
                        Arg::Long(n as i64),
                        Arg::Long(wide_out as i64),
                    ];
                    self.launch(&self.gpu.kernels.batch_norm_backward, grid(wide_out), &args)?;
                }
                Op::Dropout { .. } => {
                    let args = [Arg::Ptr(delta), Arg::Ptr(self.aux[i].ptr), Arg::Long(len as i64)];
                    self.launch(&kern.multiply_into, grid(len), &args)?;
                }
                Op::Residual { from } => {
                    // The sum's gradient reaches both addends: the ops inside
                    // the block (through delta) and the block's input.
                    let into = from - 1;
                    let target = self.pending[into].0.ensure(&s, len)?;
                    if self.pending[into].1 {
                        let args = [Arg::Ptr(target), Arg::Ptr(delta), Arg::Long(len as i64)];
                        self.launch(&kern.add_into, grid(len), &args)?;
                    } else {
                        let src = self.delta.slice.as_ref().expect("delta is allocated");
                        let dst = self.pending[into].0.slice.as_mut().expect("ensured");
                        s.memcpy_dtod(&src.slice(..len), &mut dst.slice_mut(..len))?;
                    }
                    self.pending[into].1 = true;
                }
            }
        }
        Ok(())
    }

    /// d_gain and d_shift of the norm whose parameters start at `slot`.
    fn norm_parameter_grads(&self, n: usize, wide: usize, xhat: u64, slot: usize) -> Result<(), CudaError> {
        let args = [
            Arg::Ptr(self.delta.ptr),
            Arg::Ptr(xhat),
            Arg::Ptr(self.grads[slot].ptr),
            Arg::Ptr(self.grads[slot + 1].ptr),
            Arg::Long(n as i64),
            Arg::Long(wide as i64),
        ];
        self.launch(&self.gpu.kernels.norm_parameter_grads, grid(wide), &args)
    }

    /// The first dense layer's weight gradient, and through it the
    /// embedding tables'.
    fn input_dense_backward(&mut self, n: usize, outputs: usize, delta: u64) -> Result<(), CudaError> {
        let (k, s) = (self.k, self.stream.clone());
        let (p, e) = (self.arch.inputs, self.arch.embedded_width());
        let fan_in = p + e;
        let slot = self.arch.embeddings.len();
        let (w, gw) = (self.params[slot].ptr, self.grads[slot].ptr);
        let d_t = operand(delta, k * outputs, outputs, true);
        if p > 0 {
            let x = operand(self.x.ptr, p, 0, false);
            self.gemm((outputs, p, n), d_t, x, 0.0, operand(gw, fan_in, outputs * fan_in, false))?;
        }
        if e == 0 {
            return Ok(());
        }
        let emb = operand(self.emb.ptr, k * e, e, false);
        self.gemm((outputs, e, n), d_t, emb, 0.0, operand(at(gw, p), fan_in, outputs * fan_in, false))?;
        let d_emb = self.d_emb.ensure(&s, n * k * e)?;
        let d = operand(delta, k * outputs, outputs, false);
        let w_emb = operand(at(w, p), fan_in, outputs * fan_in, false);
        self.gemm((n, e, outputs), d, w_emb, 0.0, operand(d_emb, k * e, e, false))?;
        let mut offset = 0;
        for (c, spec) in self.arch.embeddings.iter().enumerate() {
            let args = [
                Arg::Ptr(self.grads[c].ptr),
                Arg::Ptr(self.codes.ptr),
                Arg::Ptr(d_emb),
                Arg::Long(n as i64),
                Arg::Int(k as i32),
                Arg::Int(self.arch.embeddings.len() as i32),
                Arg::Int(c as i32),
                Arg::Int(spec.vocabulary as i32),
                Arg::Int(spec.dim as i32),
                Arg::Int(e as i32),
                Arg::Int(offset as i32),
            ];
            self.launch(&self.gpu.kernels.scatter_embedding, grid(k * spec.dim), &args)?;
            offset += spec.dim;
        }
        Ok(())
    }

    /// One optimiser step for the active models, then their BatchNorm running averages.
    fn optimise(&mut self, settings: &[ModelStep], active: &[bool]) -> Result<(), CudaError> {
        let (k, s) = (self.k, self.stream.clone());
        let (beta1, beta2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let mut host = vec![0.0f32; k * SETTINGS];
        for m in 0..k {
            if !active[m] {
                continue;
            }
            self.model_steps[m] += 1;
            let t = self.model_steps[m];
            let st = settings[m];
            host[m * SETTINGS..(m + 1) * SETTINGS].copy_from_slice(&[
                st.lr,
                st.weight_decay,
                st.momentum,
                st.clip_norm,
                1.0 - beta1.powi(t),
                1.0 - beta2.powi(t),
                1.0,
                0.0,
            ]);
        }
        let settings_ptr = self.settings.upload(&s, &host)?;
        let kern = &self.gpu.kernels;
        if settings.iter().zip(active).any(|(st, &a)| a && st.clip_norm > 0.0) {
            s.memset_zeros(&mut self.norms.slice.as_mut().expect("allocated").slice_mut(..k))?;
            for (g, slot) in self.grads.iter().zip(&self.slots) {
                let config = LaunchConfig { grid_dim: (k as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
                self.launch(
                    &kern.squared_norms,
                    config,
                    &[Arg::Ptr(g.ptr), Arg::Ptr(self.norms.ptr), Arg::Long(slot.len as i64)],
                )?;
            }
        }
        let kind = match self.optimizer {
            Optimizer::Adam => 0,
            Optimizer::AdamW => 1,
            Optimizer::Sgd => 2,
        };
        for (i, slot) in self.slots.iter().enumerate() {
            let args = [
                Arg::Ptr(self.params[i].ptr),
                Arg::Ptr(self.grads[i].ptr),
                Arg::Ptr(self.first[i].ptr),
                Arg::Ptr(self.second[i].ptr),
                Arg::Long(slot.len as i64),
                Arg::Int(k as i32),
                Arg::Ptr(settings_ptr),
                Arg::Ptr(self.norms.ptr),
                Arg::Int(kind),
                Arg::Int(slot.decay as i32),
                Arg::Float(beta1),
                Arg::Float(beta2),
                Arg::Float(eps),
            ];
            self.launch(&kern.optimizer_step, grid(k * slot.len), &args)?;
        }
        for (i, op) in self.arch.ops.iter().enumerate() {
            let Op::BatchNorm { width } = *op else { continue };
            let state = self.arch.state_of(i);
            let args = [
                Arg::Ptr(self.state[state].ptr),
                Arg::Ptr(self.state[state + 1].ptr),
                Arg::Ptr(self.stats[i].ptr),
                Arg::Ptr(self.active.ptr),
                Arg::Long((k * width) as i64),
                Arg::Int(width as i32),
                Arg::Float(BATCH_NORM_MOMENTUM),
            ];
            self.launch(&kern.batch_norm_running, grid(k * width), &args)?;
        }
        Ok(())
    }

    fn train_epoch(
        &mut self,
        steps: usize,
        source: &dyn BatchSource,
        settings: &(dyn Fn(usize, usize) -> ModelStep + Sync),
        active: &[bool],
        losses: &mut [f64],
    ) -> Result<(), CudaError> {
        let s = self.stream.clone();
        let flags: Vec<f32> = active.iter().map(|&a| a as u8 as f32).collect();
        self.active.upload(&s, &flags)?;
        s.memset_zeros(&mut self.loss_sums.slice.as_mut().expect("allocated").slice_mut(..self.k))?;
        let mut mb = MiniBatch::default();
        let mut step_settings = Vec::with_capacity(self.k);
        for i in 0..steps {
            let (batch, y) = source.batch(i, &mut mb);
            let n = batch.n;
            self.upload_batch(batch)?;
            self.forward(n, Some(self.steps))?;
            self.loss_and_grad(n, y)?;
            self.backward(n)?;
            step_settings.clear();
            step_settings.extend((0..self.k).map(|m| settings(i, m)));
            self.optimise(&step_settings, active)?;
            self.steps += 1;
        }
        let sums = self.loss_sums.download(&s, self.k)?;
        for (m, total) in sums.into_iter().enumerate() {
            if active[m] {
                losses[m] += total;
            }
        }
        Ok(())
    }

    fn scores(&mut self, batch: Batch<'_>, chunk_rows: usize) -> Result<Vec<f32>, CudaError> {
        let width = self.k * self.arch.outputs();
        let (inputs, cols) = (self.arch.inputs, self.arch.embeddings.len());
        let mut out = Vec::with_capacity(batch.n * width);
        for start in (0..batch.n).step_by(chunk_rows.max(1)) {
            let rows = batch.rows(start..(start + chunk_rows).min(batch.n), inputs, cols);
            self.upload_batch(rows)?;
            self.forward(rows.n, None)?;
            let last = *self.source.last().expect("a network has ops");
            out.extend(self.outs[last].download(&self.stream, rows.n * width)?);
        }
        Ok(out)
    }

    fn host_stack(&self) -> Result<Stack, CudaError> {
        let s = &self.stream;
        let params: Result<Vec<_>, _> =
            self.params.iter().zip(&self.slots).map(|(b, slot)| b.download(s, self.k * slot.len)).collect();
        let state: Result<Vec<_>, _> = self
            .arch
            .ops
            .iter()
            .filter_map(|op| if let Op::BatchNorm { width } = op { Some(*width) } else { None })
            .flat_map(|w| [w, w])
            .zip(&self.state)
            .map(|(w, b)| b.download(s, self.k * w))
            .collect();
        Ok(Stack { k: self.k, arch: self.arch.clone(), params: params?, state: state?, seed: self.seed })
    }
}

fn activation_code(f: Activation) -> i32 {
    match f {
        Activation::Relu => 0,
        Activation::Gelu => 1,
        Activation::Silu => 2,
        Activation::Tanh => 3,
    }
}

impl StackTrainer for CudaTrainer {
    fn device(&self) -> &str {
        &self.gpu.name
    }

    fn epoch(
        &mut self,
        steps: usize,
        source: &dyn BatchSource,
        settings: &(dyn Fn(usize, usize) -> ModelStep + Sync),
        active: &[bool],
        losses: &mut [f64],
    ) -> Result<(), BackendError> {
        Ok(self.train_epoch(steps, source, settings, active, losses)?)
    }

    fn predict(&mut self, batch: Batch<'_>, chunk_rows: usize) -> Result<Vec<f32>, BackendError> {
        Ok(self.scores(batch, chunk_rows)?)
    }

    fn model(&self, m: usize) -> Result<Stack, BackendError> {
        Ok(self.host_stack()?.model(m))
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::backend::{self, Compute, DeviceChoice};
    use super::super::stack::test_support::every_gpu_op;
    use super::*;

    /// Fixed minibatches of `rows` rows, borrowed from whole arrays.
    struct Steps {
        x: Vec<f32>,
        codes: Vec<u32>,
        y: Vec<f32>,
        rows: usize,
    }

    impl Steps {
        /// 3 numeric inputs and one code per row (3 = never seen); targets for `head`.
        fn new(n: usize, rows: usize, head: Head, seed: u64) -> Steps {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let x: Vec<f32> = (0..n * 3).map(|_| rng.random_range(-1.0..1.0)).collect();
            let codes = (0..n).map(|r| (r % 4) as u32).collect();
            let y = (0..n)
                .map(|r| {
                    let signal = x[r * 3] - 0.5 * x[r * 3 + 1] + 0.3 * (r % 4) as f32;
                    match head {
                        Head::Binary => (signal > 0.2) as u8 as f32,
                        Head::Multiclass(c) => ((signal + 1.5).max(0.0) as usize).min(c - 1) as f32,
                        Head::Regression => signal,
                    }
                })
                .collect();
            Steps { x, codes, y, rows }
        }

        fn all(&self) -> Batch<'_> {
            Batch { x: &self.x, codes: &self.codes, n: self.y.len() }
        }
    }

    impl BatchSource for Steps {
        fn batch<'s>(&'s self, i: usize, _: &'s mut MiniBatch) -> (Batch<'s>, &'s [f32]) {
            let r = i * self.rows..(i + 1) * self.rows;
            (Batch { x: &self.x[r.start * 3..r.end * 3], codes: &self.codes[r.clone()], n: self.rows }, &self.y[r])
        }
    }

    /// A trainer on GPU 0, or None (saying why) on a machine without one.
    fn on_gpu(stack: Stack, loss: Loss, optimizer: Optimizer) -> Option<Box<dyn StackTrainer>> {
        match backend::start(stack, loss, optimizer, Compute { device: DeviceChoice::Cuda(0), threads: 1 }) {
            Ok(t) => Some(t),
            Err(BackendError::Cuda(e @ (CudaError::NoGpu(_) | CudaError::Library(_))))
                if std::env::var_os("CEREBRO_REQUIRE_GPU").is_none() =>
            {
                eprintln!("skipped: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    fn stack(k: usize, outputs: usize, first_seed: u64) -> Stack {
        let mut rngs: Vec<ChaCha8Rng> = (first_seed..first_seed + k as u64).map(ChaCha8Rng::seed_from_u64).collect();
        Stack::new(every_gpu_op(Activation::Gelu, outputs), 7, &mut rngs)
    }

    /// Two epochs of 6 steps for the trainer's models, which are models
    /// `models` of the test's numbering (their settings; model 1 sits out).
    fn train(t: &mut dyn StackTrainer, data: &Steps, models: std::ops::Range<usize>, clip_norm: f32) -> Vec<Vec<f64>> {
        let first = models.start;
        let settings = move |i: usize, m: usize| ModelStep {
            lr: 0.01 * (1.0 + (first + m) as f32) / (1.0 + i as f32 * 0.1),
            weight_decay: 0.01,
            momentum: 0.9,
            clip_norm,
        };
        let active: Vec<bool> = models.clone().map(|m| m != 1).collect();
        (0..2)
            .map(|_| {
                let mut losses = vec![0.0; models.len()];
                t.epoch(6, data, &settings, &active, &mut losses).unwrap();
                losses
            })
            .collect()
    }

    fn close(a: f32, b: f32, tolerance: f32) -> bool {
        (a - b).abs() <= tolerance * a.abs().max(b.abs()).max(1.0)
    }

    /// Periodic embeddings have no kernels: the GPU refuses them at once,
    /// saying where they train, before it looks for a GPU at all.
    #[test]
    fn periodic_embeddings_are_refused_on_the_gpu() {
        let arch = super::super::stack::test_support::every_op(Activation::Relu, 1);
        let stack = Stack::new(arch, 1, &mut [ChaCha8Rng::seed_from_u64(1)]);
        let refused = CudaTrainer::new(stack, Loss::new(Head::Binary), Optimizer::Adam, 0).err().expect("refused");
        assert!(matches!(refused, CudaError::Unsupported(_)), "{refused}");
        assert!(refused.to_string().contains("device = cpu"), "{refused}");
    }
    #[test]
    fn gpu_training_agrees_with_the_cpu_engine() {
        let cases = [
            (Loss { class_weights: vec![1.0, 2.5], ..Loss::new(Head::Binary) }, Optimizer::Adam, 0.0),
            (Loss { class_weights: vec![1.0, 0.5, 2.0], ..Loss::new(Head::Multiclass(3)) }, Optimizer::AdamW, 0.5),
            (Loss { huber_delta: 0.5, ..Loss::new(Head::Regression) }, Optimizer::Sgd, 0.0),
            // Label smoothing, with and without class weights.
            (
                Loss { label_smoothing: 0.1, class_weights: vec![1.0, 2.5], ..Loss::new(Head::Binary) },
                Optimizer::Adam,
                0.0,
            ),
            (Loss { label_smoothing: 0.2, ..Loss::new(Head::Multiclass(3)) }, Optimizer::Adam, 0.0),
            (
                Loss { label_smoothing: 0.1, class_weights: vec![1.0, 0.5, 2.0], ..Loss::new(Head::Multiclass(3)) },
                Optimizer::AdamW,
                0.5,
            ),
        ];
        for (loss, optimizer, clip) in cases {
            let (k, c) = (3, loss.head.outputs());
            let data = Steps::new(6 * 32, 32, loss.head, 11);
            let Some(mut gpu) = on_gpu(stack(k, c, 0), loss.clone(), optimizer) else { return };
            let mut cpu = backend::start(stack(k, c, 0), loss.clone(), optimizer, Compute::cpu(1)).unwrap();
            let (on_gpu_losses, on_cpu_losses) =
                (train(gpu.as_mut(), &data, 0..k, clip), train(cpu.as_mut(), &data, 0..k, clip));
            for (g, c) in on_gpu_losses.iter().flatten().zip(on_cpu_losses.iter().flatten()) {
                assert!(close(*g as f32, *c as f32, 1e-3), "{:?}: losses {g} vs {c}", loss.head);
            }
            for m in 0..k {
                let (g, c) = (gpu.model(m).unwrap(), cpu.model(m).unwrap());
                for (gs, cs) in g.params.iter().chain(&g.state).zip(c.params.iter().chain(&c.state)) {
                    for (a, b) in gs.iter().zip(cs) {
                        assert!(close(*a, *b, 2e-3), "{:?} model {m}: parameter {a} vs {b}", loss.head);
                    }
                }
            }
            let held_out = Steps::new(50, 50, loss.head, 12);
            let (g, h) = (gpu.predict(held_out.all(), 16).unwrap(), cpu.predict(held_out.all(), 16).unwrap());
            assert_eq!(g.len(), 50 * k * c);
            for (a, b) in g.iter().zip(&h) {
                assert!(close(*a, *b, 2e-3), "{:?}: scores {a} vs {b}", loss.head);
            }
            eprintln!("{:?} agreed on {}", loss.head, gpu.device());
        }
    }

    #[test]
    fn gpu_runs_repeat_and_a_fused_model_matches_it_alone() {
        let loss = Loss::new(Head::Binary);
        let data = Steps::new(6 * 32, 32, Head::Binary, 5);
        let Some(mut first) = on_gpu(stack(3, 1, 0), loss.clone(), Optimizer::Adam) else { return };
        let mut second = on_gpu(stack(3, 1, 0), loss.clone(), Optimizer::Adam).expect("the GPU is still there");
        let mut alone = on_gpu(stack(1, 1, 2), loss.clone(), Optimizer::Adam).expect("the GPU is still there");
        train(first.as_mut(), &data, 0..3, 1.0);
        train(second.as_mut(), &data, 0..3, 1.0);
        train(alone.as_mut(), &data, 2..3, 1.0);
        for m in 0..3 {
            assert_eq!(first.model(m).unwrap(), second.model(m).unwrap(), "model {m} differs between runs");
        }
        // cuBLAS may pick another kernel for another batch count, so alone
        // and fused agree to rounding on a GPU (bit for bit on the CPU).
        let (fused, solo) = (first.model(2).unwrap(), alone.model(0).unwrap());
        for (a, b) in fused.params.iter().flatten().zip(solo.params.iter().flatten()) {
            assert!(close(*a, *b, 1e-4), "fused {a} vs alone {b}");
        }
    }

    #[test]
    fn device_choices_say_what_they_got() {
        let loss = Loss::new(Head::Binary);
        let gpu = backend::start(
            stack(1, 1, 0),
            loss.clone(),
            Optimizer::Adam,
            Compute { device: DeviceChoice::Cuda(0), threads: 1 },
        );
        let auto =
            backend::start(stack(1, 1, 0), loss, Optimizer::Adam, Compute { device: DeviceChoice::Auto, threads: 2 })
                .unwrap();
        match gpu {
            Ok(gpu) => {
                assert!(gpu.device().starts_with("cuda:0 "), "{}", gpu.device());
                assert_eq!(auto.device(), gpu.device());
            }
            Err(e) => {
                let text = e.to_string();
                assert!(text.starts_with("no GPU") || text.starts_with("the CUDA library"), "{text}");
                assert_eq!(auto.device(), "cpu, 2 threads");
            }
        }
    }

    #[test]
    fn every_kernel_the_trainer_loads_is_defined_once() {
        let defined: Vec<&str> = KERNELS
            .split("extern \"C\" __global__ void ")
            .skip(1)
            .map(|rest| rest.split('(').next().unwrap().trim())
            .collect();
        let mut sorted = defined.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), defined.len(), "a kernel is defined twice");
        let mut loaded = Kernels::NAMES.to_vec();
        loaded.sort_unstable();
        assert_eq!(loaded, sorted);
    }

    /// NVRTC compiles without a GPU, so wherever libnvrtc is installed (CI
    /// installs it) the kernels are compiled for the data-centre GPUs.
    #[test]
    fn kernels_compile_with_nvrtc() {
        if !nvrtc_present() {
            assert!(
                std::env::var_os("CEREBRO_REQUIRE_NVRTC").is_none(),
                "CEREBRO_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)"
            );
            eprintln!("skipped: libnvrtc is not installed, so the CUDA kernels were not compiled");
            return;
        }
        for arch in ["sm_80", "sm_90"] {
            let cubin = compile(arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(cubin.starts_with(b"\x7fELF"), "{arch}: not a cubin");
        }
        let err = compile("sm_1").unwrap_err().to_string();
        assert!(err.contains("sm_1"), "{err}");
    }
}
