//! AdamW per parameter group, with its state exposed for checkpoints (candle-nn's keeps its
//! moments private), gradient clipping per group and the reference code's learning-rate schedule.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var, bail};
use serde::{Deserialize, Serialize};

/// PyTorch's `torch.optim.AdamW` hyper-parameters. The reference trains with weight decay 0
/// (candle-nn's default of 0.01 would differ).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 5e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Parameters optimised together: one learning rate, one clipping norm, one step count.
pub struct ParamGroup {
    pub name: String,
    pub params: Vec<(String, Var)>,
    pub lr: f64,
    moments: Vec<Option<(Tensor, Tensor)>>,
    step: u64,
}

impl ParamGroup {
    pub fn step_count(&self) -> u64 {
        self.step
    }
}

/// What a step did to each group: the gradient norm before clipping.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    pub grad_norms: Vec<f64>,
}

/// Each group's name and step count.
pub type GroupSteps = Vec<(String, u64)>;

pub struct AdamW {
    pub config: AdamWConfig,
    groups: Vec<ParamGroup>,
}

impl AdamW {
    /// One group per `(name, parameters)`, each starting at `config.lr`.
    pub fn new(groups: Vec<(String, Vec<(String, Var)>)>, config: AdamWConfig) -> Result<Self> {
        let groups = groups
            .into_iter()
            .map(|(name, params)| {
                let n = params.len();
                ParamGroup { name, params, lr: config.lr, moments: vec![None; n], step: 0 }
            })
            .collect();
        Ok(Self { config, groups })
    }

    pub fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    /// Every group's learning rate.
    pub fn set_lr(&mut self, lr: f64) {
        self.groups.iter_mut().for_each(|g| g.lr = lr);
    }

    /// One step of every group: gradients clipped to `max_norm` per group when given (PyTorch's
    /// `clip_grad_norm_`: `g *= min(1, max_norm / (norm + 1e-6))`), then AdamW. Parameters without
    /// a gradient are left alone, as PyTorch skips them.
    pub fn step(&mut self, grads: &GradStore, max_norm: Option<f64>) -> Result<StepReport> {
        let c = self.config;
        let mut report = StepReport::default();
        for group in &mut self.groups {
            let gs: Vec<Option<Tensor>> = group.params.iter().map(|(_, v)| grads.get(v.as_tensor()).cloned()).collect();
            let mut sq = 0f64;
            for g in gs.iter().flatten() {
                sq += g.to_dtype(candle_core::DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
            }
            let norm = sq.sqrt();
            report.grad_norms.push(norm);
            if gs.iter().all(Option::is_none) {
                continue;
            }
            let clip = match max_norm {
                Some(m) => (m / (norm + 1e-6)).min(1.0),
                None => 1.0,
            };
            group.step += 1;
            let t = group.step as i32;
            let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
            for (i, g) in gs.into_iter().enumerate() {
                let Some(g) = g else { continue };
                let g = if clip < 1.0 { (g * clip)? } else { g };
                let var = &group.params[i].1;
                let (fresh_m, fresh_v) = ((&g * (1.0 - c.beta1))?, (g.sqr()? * (1.0 - c.beta2))?);
                let (m, v) = match group.moments[i].take() {
                    Some((m, v)) => (((m * c.beta1)? + fresh_m)?, ((v * c.beta2)? + fresh_v)?),
                    None => (fresh_m, fresh_v),
                };
                let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
                let mut p = var.as_tensor().detach();
                if c.weight_decay != 0.0 {
                    p = (p * (1.0 - group.lr * c.weight_decay))?;
                }
                let p = (&p - (m.div(&denom)? * (group.lr / bc1))?)?;
                var.set(&p)?;
                group.moments[i] = Some((m, v));
            }
        }
        Ok(report)
    }

    /// The moments as tensors named `{group}.{param}.exp_avg` / `.exp_avg_sq` (PyTorch's names),
    /// and each group's step count.
    pub fn state(&self) -> (Vec<(String, Tensor)>, GroupSteps) {
        let mut tensors = Vec::new();
        for g in &self.groups {
            for ((name, _), moments) in g.params.iter().zip(&g.moments) {
                if let Some((m, v)) = moments {
                    tensors.push((format!("{}.{name}.exp_avg", g.name), m.clone()));
                    tensors.push((format!("{}.{name}.exp_avg_sq", g.name), v.clone()));
                }
            }
        }
        (tensors, self.groups.iter().map(|g| (g.name.clone(), g.step)).collect())
    }

    /// Restores what [`AdamW::state`] gave; the groups and parameters must be the same.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: &[(String, u64)]) -> Result<()> {
        if steps.len() != self.groups.len() {
            bail!("the optimizer state has {} groups, this run {}", steps.len(), self.groups.len());
        }
        for (g, (name, step)) in self.groups.iter_mut().zip(steps) {
            if &g.name != name {
                bail!("optimizer group `{name}` in the state, `{}` in this run", g.name);
            }
            g.step = *step;
            for (i, (param, var)) in g.params.iter().enumerate() {
                let m = tensors.get(&format!("{}.{param}.exp_avg", g.name));
                let v = tensors.get(&format!("{}.{param}.exp_avg_sq", g.name));
                g.moments[i] = match (m, v) {
                    (Some(m), Some(v)) if m.dims() == var.dims() && v.dims() == var.dims() => {
                        Some((m.to_device(var.device())?, v.to_device(var.device())?))
                    }
                    (None, None) => None,
                    _ => bail!("the optimizer state of `{param}` is missing or has another shape"),
                };
            }
        }
        Ok(())
    }
}

/// The reference code's per-epoch learning rate: `warmup` epochs of exponential warm-up
/// (`base * 2.718^(10 (e / warmup - 1))`), then polynomial decay `base * (1 - e / epochs)^0.9`.
/// (The reference writes 2.718, not e; the schedule keeps its literal.)
#[allow(clippy::approx_constant)]
pub fn learning_rate(base: f64, epoch: usize, warmup: usize, epochs: usize) -> f64 {
    let e = epoch as f64;
    if warmup > 0 && epoch <= warmup {
        base * 2.718f64.powf(10.0 * (e / warmup as f64 - 1.0))
    } else {
        base * (1.0 - e / epochs.max(1) as f64).max(0.0).powf(0.9)
    }
}
