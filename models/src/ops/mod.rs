//! The 3D operations SwinUNETR and the AutoProSAM teacher need and Candle 0.11 lacks.
//!
//! Every op has a backward pass (the training crate relies on it): composed from Candle primitives,
//! or, for the stride-1 convolution on the CPU, a custom op with its own. Fused inference kernels
//! without a backward pass (attention, norms, GELU) are used only when no gradient graph is being
//! recorded (`Tensor::track_op`).
//! Layouts follow PyTorch: volumes are `(B, C, D, H, W)`, weights `(out, in, kd, kh, kw)` for
//! convolutions and `(in, out, kd, kh, kw)` for transposed convolutions.

pub mod activation;
pub mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_avx2;
pub mod conv3d;
#[cfg(target_arch = "x86_64")]
mod conv3d_avx512;
mod conv3d_cpu;
#[cfg(target_arch = "x86_64")]
mod conv3d_int16;
mod conv3d_int8;
pub mod conv_transpose3d;
pub mod norm;
pub mod quantized;
pub mod resample;
mod simd;
pub mod window;
pub mod window_gather;

pub use activation::gelu_erf;
pub use attention::{window_attention, window_attention_qkv};
pub use conv_transpose3d::{conv_transpose3d, conv_transpose3d_cat};
pub use conv3d::{
    ConvArithmetic, PendingNorm, PlaneMoments, conv3d, conv3d_weight, conv3d_with_moments, depthwise_conv3d,
    int16_convolutions_available,
};
pub use norm::{channel_layer_norm, instance_norm, instance_norm_act, instance_norm_act_with_moments};
pub use resample::{interpolate_linear, max_pool3d};
pub use window::{compute_shift_mask, compute_shift_regions, window_partition, window_reverse};

/// Softmax over the last axis: the fused kernel for inference, the differentiable one while training.
pub(crate) fn softmax_last_dim(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    if x.track_op() { candle_nn::ops::softmax(x, candle_core::D::Minus1) } else { candle_nn::ops::softmax_last_dim(x) }
}

/// The `[start, end)` element range of a custom op's contiguous input; an error naming the op
/// otherwise (the CPU kernels index storage slices directly).
pub(crate) fn contiguous_range(l: &candle_core::Layout, op: &str) -> candle_core::Result<(usize, usize)> {
    l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("{op}: inputs must be contiguous")))
}
