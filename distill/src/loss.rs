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
    let ce = (log_p * &target)?.sum(1)?.mean_all()?.neg()?;
    (dice * lambda_dice)? + (ce * lambda_ce)?
}

/// The teacher's loss: Dice + cross-entropy, 0.5 each.
pub fn teacher_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    dice_ce(logits, labels, 0.5, 0.5)
}
