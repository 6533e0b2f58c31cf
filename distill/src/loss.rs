//! Segmentation losses, differentiable in Candle.

use candle_core::{D, DType, Result, Tensor, bail};

/// MONAI's `smooth_nr` and `smooth_dr` defaults.
pub const DICE_SMOOTH: f64 = 1e-5;

/// One-hot `(B, classes, voxels...)` of integer labels `(B, voxels...)`, in `dtype`.
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let ids = Tensor::arange(0u32, classes as u32, labels.device())?;
    let mut shape = vec![1, classes];
    shape.extend(std::iter::repeat_n(1, labels.rank() - 1));
    let ids = ids.reshape(shape)?;
    labels.to_dtype(DType::U32)?.unsqueeze(1)?.broadcast_eq(&ids)?.to_dtype(dtype)
}

/// MONAI's `DiceCELoss(include_background=True, to_onehot_y=True, softmax=True, lambda_dice,
/// lambda_ce)` with its defaults (`smooth_nr = smooth_dr = 1e-5`, `squared_pred=False`,
/// `batch=False`): `logits (B, C, D, H, W)`, `labels (B, D, H, W)` of class numbers.
///
/// Dice is averaged over (sample, class) of `1 - (2 sum(p g) + s) / (sum p + sum g + s)`, the
/// cross-entropy over voxels of `-log p[label]`.
pub fn dice_ce(logits: &Tensor, labels: &Tensor, lambda_dice: f64, lambda_ce: f64) -> Result<Tensor> {
    dice_ce_weighted(logits, labels, lambda_dice, lambda_ce, None)
}

/// [`dice_ce`] with class weights `ce_weight` (C values) on the cross-entropy, as MONAI's
/// `ce_weight` passes them to PyTorch's `CrossEntropyLoss(weight)`: the voxels' `-log p[label]`
/// averaged with weights `w[label]`, `sum w[y] (-log p[y]) / sum w[y]`. The Dice term is not
/// weighted (it already counts every class equally).
pub fn dice_ce_weighted(
    logits: &Tensor,
    labels: &Tensor,
    lambda_dice: f64,
    lambda_ce: f64,
    ce_weight: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, c) = (logits.dim(0)?, logits.dim(1)?);
    if labels.dims()[0] != b || labels.dims()[1..] != logits.dims()[2..] {
        bail!("dice_ce: labels {:?} do not match logits {:?}", labels.dims(), logits.dims());
    }
    let flat = logits.reshape((b, c, ()))?;
    let target = one_hot(&labels.reshape((b, ()))?, c, logits.dtype())?;
    let log_p = candle_nn::ops::log_softmax(&flat, 1)?;
    let p = log_p.exp()?;
    let intersection = (&p * &target)?.sum(D::Minus1)?;
    let denominator = (p.sum(D::Minus1)? + target.sum(D::Minus1)?)?;
    let dice = (1.0 - ((intersection * 2.0)? + DICE_SMOOTH)?.div(&(denominator + DICE_SMOOTH)?)?)?.mean_all()?;
    let nll = (log_p * &target)?.sum(1)?.neg()?;
    let ce = match ce_weight {
        None => nll.mean_all()?,
        Some(w) => {
            if w.dims1()? != c {
                bail!("dice_ce: {} class weights for {c} classes", w.dims1()?);
            }
            let voxel_weight = target.broadcast_mul(&w.to_dtype(logits.dtype())?.reshape((1, c, 1))?)?.sum(1)?;
            // A crop whose labels all weigh 0 has no cross-entropy term (0, not 0 / 0).
            (nll * &voxel_weight)?.sum_all()?.broadcast_div(&voxel_weight.sum_all()?.maximum(1e-12)?)?
        }
    };
    (dice * lambda_dice)? + (ce * lambda_ce)?
}

/// Class weights for [`dice_ce_weighted`] from the voxel counts of each class in the training
/// labels: `1 / sqrt(frequency)`, so that a class a hundred times rarer weighs ten times more per
/// voxel (a milder form of inverse-frequency weighting); classes with no voxel get 0.
pub fn inverse_sqrt_frequency_weights(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts.iter().map(|&n| if n == 0 { 0.0 } else { (total as f64 / n as f64).sqrt() }).collect()
}

/// The teacher's loss: Dice + cross-entropy, 0.5 each (the cross-entropy weighted by `ce_weight`
/// if given).
pub fn teacher_loss(logits: &Tensor, labels: &Tensor, ce_weight: Option<&Tensor>) -> Result<Tensor> {
    dice_ce_weighted(logits, labels, 0.5, 0.5, ce_weight)
}

/// What the student matches of the teacher (`../shared/spec/teacher.md` 8 (d)).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KdLoss {
    /// Mean over (class, voxel) of the squared logit difference: the spec's default.
    MseLogits,
    /// The same on softmax probabilities.
    MseProbabilities,
    /// `T^2 KL(softmax(t/T) || softmax(s/T))`, summed over classes, averaged over voxels.
    Kl { temperature: f64 },
}

impl std::str::FromStr for KdLoss {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mse" | "mse_logits" => Ok(KdLoss::MseLogits),
            "mse_prob" | "mse_probabilities" => Ok(KdLoss::MseProbabilities),
            _ => match s.strip_prefix("kl") {
                Some("") => Ok(KdLoss::Kl { temperature: 1.0 }),
                Some(t) => t
                    .trim_start_matches(':')
                    .parse::<f64>()
                    .ok()
                    .filter(|t| *t > 0.0)
                    .map(|temperature| KdLoss::Kl { temperature })
                    .ok_or_else(|| format!("`{s}`: the KL temperature is a positive number (kl:2)")),
                None => Err(format!("`{s}` is not a KD loss (mse, mse_prob, kl or kl:T)")),
            },
        }
    }
}

/// The KD term between `student` and `teacher` logits `(B, C, D, H, W)`; the teacher's carry no
/// gradient.
pub fn kd_loss(student: &Tensor, teacher: &Tensor, kind: KdLoss) -> Result<Tensor> {
    let teacher = teacher.detach();
    match kind {
        KdLoss::MseLogits => (student - &teacher)?.sqr()?.mean_all(),
        KdLoss::MseProbabilities => {
            let p = candle_nn::ops::softmax(student, 1)?;
            let q = candle_nn::ops::softmax(&teacher, 1)?;
            (p - q)?.sqr()?.mean_all()
        }
        KdLoss::Kl { temperature } => {
            let log_s = candle_nn::ops::log_softmax(&(student / temperature)?, 1)?;
            let log_t = candle_nn::ops::log_softmax(&(teacher / temperature)?, 1)?;
            let kl = (log_t.exp()? * (log_t - log_s)?)?.sum(1)?.mean_all()?;
            kl * (temperature * temperature)
        }
    }
}

/// Distillation's loss: `(1 - lambda) DiceCE(student, labels) + lambda KD(student, teacher)`,
/// DiceCE in the teacher's 0.5/0.5 form (its cross-entropy weighted by `ce_weight` if given).
/// Without a teacher (`lambda = 0`), plain supervised training.
pub fn distillation_loss(
    student: &Tensor,
    labels: &Tensor,
    teacher: Option<&Tensor>,
    lambda: f64,
    kind: KdLoss,
    ce_weight: Option<&Tensor>,
) -> Result<Tensor> {
    let supervised = dice_ce_weighted(student, labels, 0.5, 0.5, ce_weight)?;
    match teacher {
        Some(t) if lambda > 0.0 => (supervised * (1.0 - lambda))? + (kd_loss(student, t, kind)? * lambda)?,
        _ => Ok(supervised),
    }
}
