//! Where a stack trains: the CPU engine or a CUDA GPU, behind one trait.
//!
//! The trainer of a job is chosen once, from the daemon's `device` setting:
//! `cpu`, `cuda` / `cuda:N` (an error when that GPU cannot be used), or
//! `auto` (the first GPU when one is usable, else the CPU, saying why).

use std::fmt;
use std::str::FromStr;

use cerebro_shared::spec::Optimizer;
use tracing::warn;

use super::cuda::{CudaError, CudaTrainer};
use super::loss::Loss;
use super::optim::ModelStep;
use super::stack::{Batch, Stack};
use super::trainer::{BatchSource, ThreadsError, Trainer};

/// The `device` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// GPU number N; training fails when it cannot be used.
    Cuda(usize),
    /// GPU 0 when usable, otherwise the CPU.
    Auto,
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<DeviceChoice, String> {
        match s.trim() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("device must be \"cpu\", \"cuda\", \"cuda:N\" or \"auto\", not {other:?}")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceChoice::Auto => f.write_str("auto"),
        }
    }
}

/// How a job's stack is trained: the device and the CPU threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compute {
    pub device: DeviceChoice,
    /// Threads of the CPU engine (also used when `auto` falls back to it).
    pub threads: usize,
}

impl Compute {
    pub fn cpu(threads: usize) -> Compute {
        Compute { device: DeviceChoice::Cpu, threads }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Threads(#[from] ThreadsError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

/// Trains a [`Stack`] of K models on one device. Every implementation gives
/// each model what it would get trained alone on the same device.
pub trait StackTrainer {
    /// The device in words, as recorded with the model ("cpu, 2 threads",
    /// "cuda:0 NVIDIA H100 80GB HBM3").
    fn device(&self) -> &str;

    /// `steps` optimiser steps, the minibatch of step `i` from `source` and
    /// model `m`'s settings from `settings(i, m)`, for the models with
    /// `active[m]`; each one's summed batch losses (loss × rows) are added
    /// to `losses[m]`.
    fn epoch(
        &mut self,
        steps: usize,
        source: &dyn BatchSource,
        settings: &(dyn Fn(usize, usize) -> ModelStep + Sync),
        active: &[bool],
        losses: &mut [f64],
    ) -> Result<(), BackendError>;

    /// Scoring logits of every model, `[n × K·out]`, `chunk_rows` rows at a time.
    fn predict(&mut self, batch: Batch<'_>, chunk_rows: usize) -> Result<Vec<f32>, BackendError>;

    /// Model `m` as it stands, on the host.
    fn model(&self, m: usize) -> Result<Stack, BackendError>;
}

/// A trainer for `stack` on the device `compute` names.
pub fn start(
    stack: Stack,
    loss: Loss,
    optimizer: Optimizer,
    compute: Compute,
) -> Result<Box<dyn StackTrainer>, BackendError> {
    match compute.device {
        DeviceChoice::Cpu => Ok(Box::new(Cpu::new(stack, loss, optimizer, compute.threads)?)),
        DeviceChoice::Cuda(ordinal) => Ok(Box::new(CudaTrainer::new(stack, loss, optimizer, ordinal)?)),
        DeviceChoice::Auto => match CudaTrainer::new(stack.clone(), loss.clone(), optimizer, 0) {
            Ok(gpu) => Ok(Box::new(gpu)),
            Err(why) => {
                if !matches!(why, CudaError::NoGpu(_)) {
                    warn!("device = auto: the GPU cannot train ({why}); training on the CPU");
                }
                Ok(Box::new(Cpu::new(stack, loss, optimizer, compute.threads)?))
            }
        },
    }
}

/// The CPU engine.
struct Cpu {
    trainer: Trainer,
    name: String,
}

impl Cpu {
    fn new(stack: Stack, loss: Loss, optimizer: Optimizer, threads: usize) -> Result<Cpu, ThreadsError> {
        let threads = threads.max(1);
        let name = format!("cpu, {threads} thread{}", if threads == 1 { "" } else { "s" });
        Ok(Cpu { trainer: Trainer::new(stack, loss, optimizer, threads)?, name })
    }
}

impl StackTrainer for Cpu {
    fn device(&self) -> &str {
        &self.name
    }

    fn epoch(
        &mut self,
        steps: usize,
        source: &dyn BatchSource,
        settings: &(dyn Fn(usize, usize) -> ModelStep + Sync),
        active: &[bool],
        losses: &mut [f64],
    ) -> Result<(), BackendError> {
        self.trainer.epoch(steps, source, settings, active, losses);
        Ok(())
    }

    fn predict(&mut self, batch: Batch<'_>, chunk_rows: usize) -> Result<Vec<f32>, BackendError> {
        Ok(self.trainer.predict(batch, chunk_rows))
    }

    fn model(&self, m: usize) -> Result<Stack, BackendError> {
        Ok(self.trainer.model(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse_and_print() {
        for (text, choice) in [
            ("cpu", DeviceChoice::Cpu),
            ("auto", DeviceChoice::Auto),
            ("cuda", DeviceChoice::Cuda(0)),
            ("cuda:3", DeviceChoice::Cuda(3)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), choice);
        }
        assert_eq!(DeviceChoice::Cuda(0).to_string(), "cuda:0");
        for bad in ["gpu", "cuda:", "cuda:x", "CPU "] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("\"cpu\", \"cuda\", \"cuda:N\" or \"auto\""), "{err}");
        }
    }
}
