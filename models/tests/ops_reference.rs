//! The 3D ops against naive f64 references (`reference/`), on random non-cubic inputs, in f64 and
//! f32, and their backward passes against f64 central finite differences.

mod reference;

use candle_core::{DType, Device, Result, Tensor, Var};
use prosam_models::ops::attention::{window_attention_chunked, window_attention_qkv};
use prosam_models::ops::window::{relative_position_index, roll_spatial, stage_window};
use prosam_models::ops::{
    channel_layer_norm, compute_shift_mask, conv_transpose3d, conv_transpose3d_cat, conv3d, depthwise_conv3d,
    instance_norm, instance_norm_act, interpolate_linear, max_pool3d, window_partition, window_reverse,
};
use reference::{Arr, Rng};

fn tensor(a: &Arr, dtype: DType) -> Tensor {
    Tensor::from_vec(a.data.clone(), a.shape.as_slice(), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Runs `op` in f64 and in f32, on plain tensors (the inference kernels) and on variables (the
/// differentiable formulations used while training), and compares each with the reference.
fn check_against_reference(name: &str, inputs: &[&Arr], expected: &Arr, op: impl Fn(&[Tensor]) -> Result<Tensor>) {
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
        for tracked in [false, true] {
            let ts: Vec<Tensor> = inputs
                .iter()
                .map(|a| {
                    let t = tensor(a, dtype);
                    if tracked { Var::from_tensor(&t).unwrap().as_tensor().clone() } else { t }
                })
                .collect();
            let y = op(&ts).unwrap();
            assert_eq!(y.dims(), expected.shape.as_slice(), "{name}: shape");
            let scale = expected.data.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let err = expected.max_abs_diff(&values(&y)) / scale;
            assert!(
                err <= tol,
                "{name} {dtype:?} (gradients recorded: {tracked}): max relative error {err:e} > {tol:e}"
            );
        }
    }
}

/// Checks the gradients of `sum(op(inputs) * r)` for random `r` against central differences, on
/// up to 20 entries of each input, and that no input is cut off from the graph.
fn check_gradients(name: &str, inputs: &[&Arr], seed: u64, op: impl Fn(&[Tensor]) -> Result<Tensor>) {
    let vars: Vec<Var> = inputs.iter().map(|a| Var::from_tensor(&tensor(a, DType::F64)).unwrap()).collect();
    let y = op(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>()).unwrap();
    let mut rng = Rng::new(seed);
    let r = rng.arr(y.dims(), 1.0);
    let r_t = tensor(&r, DType::F64);
    let loss_of = |y: &Tensor| (y * &r_t).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let grads = (y * &r_t).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-5;
    for (i, input) in inputs.iter().enumerate() {
        let g = grads.get(vars[i].as_tensor()).unwrap_or_else(|| panic!("{name}: input {i} received no gradient"));
        let g = values(g);
        assert!(g.iter().any(|v| *v != 0.0), "{name}: input {i} has an all-zero gradient");
        let picks: Vec<usize> = if input.data.len() <= 20 {
            (0..input.data.len()).collect()
        } else {
            (0..20).map(|_| rng.next_u64() as usize % input.data.len()).collect()
        };
        for &p in &picks {
            let eval = |delta: f64| {
                let ts: Vec<Tensor> = inputs
                    .iter()
                    .enumerate()
                    .map(|(j, a)| {
                        let mut a = (*a).clone();
                        if j == i {
                            a.data[p] += delta;
                        }
                        tensor(&a, DType::F64)
                    })
                    .collect();
                loss_of(&op(&ts).unwrap())
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            let err = (fd - g[p]).abs() / fd.abs().max(1.0);
            assert!(
                err < 1e-6,
                "{name}: d/d input{i}[{p}]: backward {} vs finite difference {fd} (rel err {err:e})",
                g[p]
            );
        }
    }
}

#[test]
fn conv3d_kernel3_padding1() {
    let mut rng = Rng::new(1);
    let x = rng.arr(&[2, 3, 5, 6, 7], 1.0);
    let w = rng.arr(&[4, 3, 3, 3, 3], 0.3);
    let b = rng.arr(&[4], 0.5);
    let expected = reference::conv3d(&x, &w, Some(&b.data), 1, 1);
    let op = |t: &[Tensor]| conv3d(&t[0], &t[1], Some(&t[2]), 1, 1);
    check_against_reference("conv3d k3", &[&x, &w, &b], &expected, op);
    check_gradients(
        "conv3d k3",
        &[&rng.arr(&[1, 2, 3, 4, 5], 1.0), &rng.arr(&[3, 2, 3, 3, 3], 0.3), &rng.arr(&[3], 0.5)],
        11,
        op,
    );
}

/// Shapes for the direct AVX-512 kernel (output channels in 12s or 8s, on CPUs that have it; the
/// gemm kernel elsewhere): rows of 32-voxel blocks (70 = 2 x 32 + 6) and of 16-voxel blocks with
/// ragged ends (37 = 2 x 16 + 5, 13, 6),
/// rows of 8 or fewer, padding 0 and 1, a 1 x 3 x 5 kernel, two samples, several parallel tasks;
/// gradients through the kernel (grad x is the same kernel with 12 input channels as outputs).
#[test]
fn conv3d_channel_blocks_and_ragged_rows_match_reference() {
    let mut rng = Rng::new(31);
    // (batch, c_in, c_out, input dims, kernel, padding)
    type Case = (usize, usize, usize, [usize; 3], [usize; 3], usize);
    let cases: [Case; 6] = [
        (1, 3, 12, [2, 3, 70], [3, 3, 3], 1),
        (1, 5, 12, [3, 4, 37], [3, 3, 3], 1),
        (2, 3, 8, [4, 3, 13], [3, 3, 3], 1),
        (1, 2, 24, [3, 3, 8], [3, 3, 3], 0),
        (1, 20, 12, [6, 5, 24], [3, 3, 3], 1),
        (2, 4, 16, [5, 9, 19], [1, 3, 5], 1),
    ];
    for (b, ci, co, dims, k, p) in cases {
        let x = rng.arr(&[b, ci, dims[0], dims[1], dims[2]], 1.0);
        let w = rng.arr(&[co, ci, k[0], k[1], k[2]], 0.3);
        let expected = reference::conv3d(&x, &w, None, p, 1);
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
            let y = conv3d(&tensor(&x, dtype), &tensor(&w, dtype), None, p, 1).unwrap();
            assert_eq!(y.dims(), expected.shape.as_slice());
            let scale = expected.data.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let err = expected.max_abs_diff(&values(&y)) / scale;
            assert!(err <= tol, "conv3d {:?} {dtype:?}: relative error {err:e}", (b, ci, co, dims, k, p));
        }
    }
    // Gradients in f32 (the direct kernel computes grad x) against f64 (the gemm kernel), which
    // the finite-difference and adjoint tests check.
    let (x, w, r) =
        (rng.arr(&[1, 12, 3, 3, 10], 1.0), rng.arr(&[12, 12, 3, 3, 3], 0.2), rng.arr(&[1, 12, 3, 3, 10], 1.0));
    let grads = |dtype: DType| {
        let (xv, wv) = (Var::from_tensor(&tensor(&x, dtype)).unwrap(), Var::from_tensor(&tensor(&w, dtype)).unwrap());
        let y = conv3d(xv.as_tensor(), wv.as_tensor(), None, 1, 1).unwrap();
        let g = (y * tensor(&r, dtype)).unwrap().sum_all().unwrap().backward().unwrap();
        (values(g.get(xv.as_tensor()).unwrap()), values(g.get(wv.as_tensor()).unwrap()))
    };
    let ((gx64, gw64), (gx32, gw32)) = (grads(DType::F64), grads(DType::F32));
    for (name, a, b) in [("x", gx64, gx32), ("w", gw64, gw32)] {
        let scale = a.iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let err = a.iter().zip(&b).map(|(p, q)| (p - q).abs()).fold(0.0, f64::max) / scale;
        assert!(err <= 1e-5, "conv3d grad {name}: f32 off f64 by {err:e}");
    }
}

/// The fused convolution + instance norm path of a UnetResBlock at inference (moments from the
/// convolution, the norm applied as the next convolution reads its input) against the plain ops,
/// two samples of 12 channels; and the moments against f64 sums. Skipped where the direct kernel
/// does not run (no AVX-512).
#[test]
fn fused_convolution_norms_equal_the_plain_ops() {
    use prosam_models::ops::ConvArithmetic::Float;
    use prosam_models::ops::quantized::Weight;
    use prosam_models::ops::{PendingNorm, conv3d_with_moments, instance_norm_act_with_moments};
    let mut rng = Rng::new(43);
    let x = tensor(&rng.arr(&[2, 3, 5, 6, 37], 1.0), DType::F32);
    let w1 = tensor(&rng.arr(&[12, 3, 3, 3, 3], 0.3), DType::F32);
    let w2 = tensor(&rng.arr(&[12, 12, 3, 3, 3], 0.2), DType::F32);
    let residual = tensor(&rng.arr(&[2, 12, 5, 6, 37], 1.0), DType::F32);
    let (eps, slope) = (1e-5, 0.01);
    let Some((o1, m1)) = conv3d_with_moments(&x, &Weight::Dense(w1.clone()), [3; 3], 1, None, Float).unwrap() else {
        eprintln!("skipped: the direct convolution kernel does not run on this CPU");
        return;
    };
    let plain1 = conv3d(&x, &w1, None, 1, 1).unwrap();
    let v1 = values(&o1);
    assert_eq!(v1, values(&plain1), "the moments do not change the convolution");
    let plane = 5 * 6 * 37;
    for (p, &(mean, var)) in m1.iter().enumerate() {
        let vals = &v1[p * plane..(p + 1) * plane];
        let m = vals.iter().sum::<f64>() / plane as f64;
        let v = vals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / plane as f64;
        assert!((mean - m).abs() < 1e-12 && (var - v).abs() < 1e-12 * v.max(1.0), "plane {p}: {mean} {var} vs {m} {v}");
    }
    let (o2, m2) = conv3d_with_moments(
        &o1,
        &Weight::Dense(w2.clone()),
        [3; 3],
        1,
        Some(PendingNorm { moments: &m1, eps, slope }),
        Float,
    )
    .unwrap()
    .unwrap();
    let a1 = instance_norm_act(&plain1, None, Some(slope), eps).unwrap();
    let plain2 = conv3d(&a1, &w2, None, 1, 1).unwrap();
    // The residual as is, and normalised in the same pass (UnetResBlock's conv3 branch).
    for normalise in [false, true] {
        let fused =
            instance_norm_act_with_moments(&o2, m2.clone(), Some(&residual), normalise, Some(slope), eps).unwrap();
        let r = if normalise { instance_norm(&residual, eps).unwrap() } else { residual.clone() };
        let plain = instance_norm_act(&plain2, Some(&r), Some(slope), eps).unwrap();
        let (f, p) = (values(&fused), values(&plain));
        let err = f.iter().zip(&p).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-5, "fused and plain differ by {err:e} (residual normalised: {normalise})");
    }
}

/// `(mean, variance)` of each `plane`-long plane of `v`, in f64.
fn plane_moments(v: &[f64], plane: usize) -> Vec<(f64, f64)> {
    v.chunks(plane)
        .map(|p| {
            let m = p.iter().sum::<f64>() / plane as f64;
            (m, p.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / plane as f64)
        })
        .collect()
}

/// The fused convolution in 16-bit integers (int8 models on AVX-512 VNNI) against the f64
/// reference: 24 input channels (one all zero, one far off zero), 24 and 8 outputs (12- and 8-channel
/// blocks), rows of 117 (a ragged block), two samples, without and with a pending norm. Within
/// 5e-4 of the output's scale (1.2-3.4e-4 measured; the f32 kernel's error is 1e-6), yet not the
/// f32 kernel's values (so the integer kernel ran), and its moments those of its output. Skipped
/// without AVX-512 VNNI.
#[test]
fn int16_convolution_matches_f64_within_its_rounding() {
    use prosam_models::ops::quantized::Weight;
    use prosam_models::ops::{ConvArithmetic, PendingNorm, conv3d_with_moments, int16_convolutions_available};
    if !int16_convolutions_available() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI, so the 16-bit kernel does not run");
        return;
    }
    let mut rng = Rng::new(44);
    // Above the kernel's 8192 output voxels per sample.
    let dims = [2, 24, 6, 12, 117];
    let plane = 6 * 12 * 117;
    let mut x = rng.arr(&dims, 1.0);
    x.data[3 * plane..4 * plane].fill(0.0);
    for v in &mut x.data[(24 + 5) * plane..(24 + 6) * plane] {
        *v += 40.0;
    }
    let (eps, slope) = (1e-5, 0.01);
    let moments = plane_moments(&x.data, plane);
    for (c_out, with_norm) in [(24, false), (8, true), (24, true)] {
        let w = rng.arr(&[c_out, 24, 3, 3, 3], 0.2);
        let mut input = x.clone();
        if with_norm {
            for (p, &(m, var)) in moments.iter().enumerate() {
                for v in &mut input.data[p * plane..(p + 1) * plane] {
                    let t = (*v - m) / (var + eps).sqrt();
                    *v = if t > 0.0 { t } else { slope * t };
                }
            }
        }
        let expected = reference::conv3d(&input, &w, None, 1, 1);
        let run = |arithmetic| {
            let norm = with_norm.then_some(PendingNorm { moments: &moments, eps, slope });
            let weight = Weight::Dense(tensor(&w, DType::F32));
            conv3d_with_moments(&tensor(&x, DType::F32), &weight, [3; 3], 1, norm, arithmetic).unwrap().unwrap()
        };
        let ((int16, int16_moments), (float, _)) = (run(ConvArithmetic::Int16), run(ConvArithmetic::Float));
        let (int16, float) = (values(&int16), values(&float));
        let scale = expected.data.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = expected.max_abs_diff(&int16) / scale;
        let float_err = expected.max_abs_diff(&float) / scale;
        assert!(err < 5e-4, "{c_out} outputs, norm {with_norm}: 16-bit off f64 by {err:e} of the scale");
        assert!(int16 != float, "{c_out} outputs, norm {with_norm}: the f32 kernel ran (error {float_err:e})");
        let out_plane = plane;
        for (p, (&(mean, var), (m, v))) in int16_moments.iter().zip(plane_moments(&int16, out_plane)).enumerate() {
            assert!(
                (mean - m).abs() < 1e-12 && (var - v).abs() < 1e-12 * v.max(1.0),
                "plane {p}: {mean} {var} vs {m} {v}"
            );
        }
    }
}

/// The 16-bit kernel's worst case for its 32-bit sums: every activation and weight at its largest
/// magnitude with one sign (a wrapped sum would come out negative), against the f64 reference.
/// Equal weights are also the worst case of their rounding: each becomes about `2^19 / K` units
/// (`K` products per output, at most 4096 units per activation), all off by the same fraction
/// of a unit, so the output is off by up to `K / 2^20` of its scale.
#[test]
fn int16_convolution_sums_do_not_overflow() {
    use prosam_models::ops::quantized::Weight;
    use prosam_models::ops::{ConvArithmetic, conv3d_with_moments, int16_convolutions_available};
    if !int16_convolutions_available() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI, so the 16-bit kernel does not run");
        return;
    }
    for c_in in [2, 24, 48] {
        let x = Arr::new(&[1, c_in, 8, 9, 114], vec![3.0; c_in * 8 * 9 * 114]);
        let w = Arr::new(&[12, c_in, 3, 3, 3], vec![0.5; 12 * c_in * 27]);
        let expected = reference::conv3d(&x, &w, None, 1, 1);
        let weight = Weight::Dense(tensor(&w, DType::F32));
        let (y, _) = conv3d_with_moments(&tensor(&x, DType::F32), &weight, [3; 3], 1, None, ConvArithmetic::Int16)
            .unwrap()
            .unwrap();
        let scale = expected.data.iter().fold(0f64, |m, v| m.max(v.abs()));
        let err = expected.max_abs_diff(&values(&y)) / scale;
        let bound = (c_in * 27) as f64 / (1 << 20) as f64;
        assert!(err <= bound, "{c_in} input channels: off f64 by {err:e} of the scale (bound {bound:e})");
    }
}

/// A non-finite input value leaves the 16-bit call to the f32 kernel (the integer rounding has no
/// NaN): the same values, NaNs in the same places, as the float arithmetic.
#[test]
fn int16_convolution_takes_the_float_kernel_for_non_finite_input() {
    use prosam_models::ops::quantized::Weight;
    use prosam_models::ops::{ConvArithmetic, conv3d_with_moments};
    let mut rng = Rng::new(45);
    let mut x = rng.arr(&[1, 12, 8, 9, 114], 1.0);
    x.data[777] = f64::NAN;
    x.data[1234] = f64::INFINITY;
    let weight = Weight::Dense(tensor(&rng.arr(&[12, 12, 3, 3, 3], 0.2), DType::F32));
    let run = |arithmetic| conv3d_with_moments(&tensor(&x, DType::F32), &weight, [3; 3], 1, None, arithmetic).unwrap();
    let Some((float, _)) = run(ConvArithmetic::Float) else {
        eprintln!("skipped: the direct convolution kernel does not run on this CPU");
        return;
    };
    let (int16, _) = run(ConvArithmetic::Int16).unwrap();
    let bits =
        |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert!(values(&float).iter().any(|v| v.is_nan()));
    assert_eq!(bits(&int16), bits(&float));
}

/// The CPU kernel's backward pass on an input large enough for several im2col tiles per sample
/// (and a batch of two, so per-thread weight-gradient accumulators are summed), against the
/// adjoint of the convolution written as naive f64 loops.
#[test]
fn conv3d_backward_over_several_tiles_matches_the_adjoint() {
    let mut rng = Rng::new(24);
    let (b, ci, co, dims, p) = (2, 3, 4, [12usize, 12, 40], 1usize);
    let x = rng.arr(&[b, ci, dims[0], dims[1], dims[2]], 1.0);
    let w = rng.arr(&[co, ci, 3, 3, 3], 0.3);
    let r = rng.arr(&[b, co, dims[0], dims[1], dims[2]], 1.0);
    let mut grad_x = Arr::zeros(&x.shape);
    let mut grad_w = Arr::zeros(&w.shape);
    for n in 0..b {
        for o in 0..co {
            for z in 0..dims[0] {
                for y in 0..dims[1] {
                    for xo in 0..dims[2] {
                        let ry = r.at(&[n, o, z, y, xo]);
                        for c in 0..ci {
                            for t in 0..27 {
                                let (a, bb, e) = (t / 9, t / 3 % 3, t % 3);
                                let (zi, yi, xi) =
                                    ((z + a).wrapping_sub(p), (y + bb).wrapping_sub(p), (xo + e).wrapping_sub(p));
                                if zi >= dims[0] || yi >= dims[1] || xi >= dims[2] {
                                    continue;
                                }
                                let wi = [o, c, a, bb, e];
                                let xi5 = [n, c, zi, yi, xi];
                                grad_w.set(&wi, grad_w.at(&wi) + ry * x.at(&xi5));
                                grad_x.set(&xi5, grad_x.at(&xi5) + ry * w.at(&wi));
                            }
                        }
                    }
                }
            }
        }
    }
    for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
        let (xv, wv) = (Var::from_tensor(&tensor(&x, dtype)).unwrap(), Var::from_tensor(&tensor(&w, dtype)).unwrap());
        let y = conv3d(xv.as_tensor(), wv.as_tensor(), None, p, 1).unwrap();
        let grads = (y * tensor(&r, dtype)).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var, expected) in [("x", &xv, &grad_x), ("w", &wv, &grad_w)] {
            let got = values(grads.get(var.as_tensor()).unwrap());
            let scale = expected.data.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let err = expected.max_abs_diff(&got) / scale;
            assert!(err <= tol, "conv3d backward, grad {name} {dtype:?}: relative error {err:e}");
        }
    }
}

#[test]
fn conv3d_kernel1() {
    let mut rng = Rng::new(2);
    let x = rng.arr(&[2, 5, 4, 3, 6], 1.0);
    let w = rng.arr(&[3, 5, 1, 1, 1], 0.5);
    let b = rng.arr(&[3], 0.5);
    let expected = reference::conv3d(&x, &w, Some(&b.data), 0, 1);
    let op = |t: &[Tensor]| conv3d(&t[0], &t[1], Some(&t[2]), 0, 1);
    check_against_reference("conv3d k1", &[&x, &w, &b], &expected, op);
    check_gradients("conv3d k1", &[&x, &w, &b], 12, op);
}

#[test]
fn conv3d_patch_embedding_kernel2_stride2() {
    let mut rng = Rng::new(3);
    let x = rng.arr(&[2, 2, 6, 4, 8], 1.0);
    let w = rng.arr(&[5, 2, 2, 2, 2], 0.5);
    let b = rng.arr(&[5], 0.5);
    let expected = reference::conv3d(&x, &w, Some(&b.data), 0, 2);
    let op = |t: &[Tensor]| conv3d(&t[0], &t[1], Some(&t[2]), 0, 2);
    check_against_reference("conv3d k2s2", &[&x, &w, &b], &expected, op);
    check_gradients("conv3d k2s2", &[&x, &w, &b], 13, op);
}

#[test]
fn conv_transpose3d_kernel2_stride2() {
    let mut rng = Rng::new(4);
    let x = rng.arr(&[2, 4, 3, 2, 5], 1.0);
    let w = rng.arr(&[4, 3, 2, 2, 2], 0.5);
    let b = rng.arr(&[3], 0.5);
    let expected = reference::conv_transpose3d(&x, &w, Some(&b.data), 2);
    let op = |t: &[Tensor]| conv_transpose3d(&t[0], &t[1], Some(&t[2]), 2);
    check_against_reference("conv_transpose3d", &[&x, &w, &b], &expected, op);
    check_gradients("conv_transpose3d", &[&x, &w, &b], 14, op);
    // With the skip channels appended (UNETR's up-sampling step): the up-sampled channels, then
    // the skip's, batch by batch.
    let skip = rng.arr(&[x.shape[0], 3, 2 * x.shape[2], 2 * x.shape[3], 2 * x.shape[4]], 1.0);
    let up = reference::conv_transpose3d(&x, &w, None, 2);
    let c_up = up.shape[1];
    let mut expected = Arr::zeros(&[up.shape[0], c_up + 3, up.shape[2], up.shape[3], up.shape[4]]);
    let plane: usize = up.shape[2..].iter().product();
    for n in 0..up.shape[0] {
        for c in 0..c_up + 3 {
            let src = if c < c_up {
                &up.data[(n * c_up + c) * plane..][..plane]
            } else {
                &skip.data[(n * 3 + c - c_up) * plane..][..plane]
            };
            expected.data[(n * (c_up + 3) + c) * plane..][..plane].copy_from_slice(src);
        }
    }
    let cat = |t: &[Tensor]| conv_transpose3d_cat(&t[0], &t[1], &t[2]);
    check_against_reference("conv_transpose3d_cat", &[&x, &w, &skip], &expected, cat);
}

#[test]
fn instance_norm_matches_reference() {
    let mut rng = Rng::new(5);
    // A large offset checks that statistics do not lose digits to f32 accumulation.
    let mut x = rng.arr(&[2, 3, 5, 4, 6], 2.0);
    x.data.iter_mut().enumerate().for_each(|(i, v)| *v += if i % 2 == 0 { 100.0 } else { 99.0 });
    let expected = reference::instance_norm(&x, 1e-5);
    let op = |t: &[Tensor]| instance_norm(&t[0], 1e-5);
    check_against_reference("instance_norm", &[&x], &expected, op);
    check_gradients("instance_norm", &[&rng.arr(&[2, 2, 3, 2, 4], 1.0)], 15, op);
}

#[test]
fn instance_norm_with_residual_and_activation_matches_reference() {
    let mut rng = Rng::new(21);
    let x = rng.arr(&[2, 3, 5, 4, 6], 2.0);
    let r = rng.arr(&[2, 3, 5, 4, 6], 1.0);
    for slope in [0.0, 0.01, 1.0] {
        let mut normed = reference::instance_norm(&x, 1e-5);
        normed.data.iter_mut().zip(&r.data).for_each(|(v, r)| *v += r);
        let expected = reference::leaky_relu(&normed, slope);
        let op = |t: &[Tensor]| instance_norm_act(&t[0], Some(&t[1]), Some(slope), 1e-5);
        check_against_reference("instance_norm_act", &[&x, &r], &expected, op);
        check_gradients(
            "instance_norm_act",
            &[&rng.arr(&[1, 2, 3, 2, 4], 1.0), &rng.arr(&[1, 2, 3, 2, 4], 1.0)],
            22,
            op,
        );
        let plain = |t: &[Tensor]| instance_norm_act(&t[0], None, Some(slope), 1e-5);
        let expected = reference::leaky_relu(&reference::instance_norm(&x, 1e-5), slope);
        check_against_reference("instance_norm_act without residual", &[&x], &expected, plain);
    }
    let bad = Tensor::zeros((1, 2, 3, 3, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
    let other = Tensor::zeros((1, 2, 3, 3, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
    let err = instance_norm_act(&bad, Some(&other), None, 1e-5).unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
}

#[test]
fn gelu_matches_the_erf_formula() {
    let mut rng = Rng::new(23);
    let x = rng.arr(&[3, 1000], 3.0);
    let expected = Arr::new(&x.shape, x.data.iter().map(|&v| reference::gelu(v)).collect());
    check_against_reference("gelu_erf", &[&x], &expected, |t| prosam_models::ops::gelu_erf(&t[0]));
    // The f32 kernel's backward pass (f64 runs Candle's), against central differences of the
    // f64 reference.
    let xv = Var::from_tensor(&tensor(&x, DType::F32)).unwrap();
    let grads = prosam_models::ops::gelu_erf(xv.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let got = values(grads.get(xv.as_tensor()).unwrap());
    for (g, &v) in got.iter().zip(&x.data) {
        let h = 1e-6;
        let exact = (reference::gelu(v + h) - reference::gelu(v - h)) / (2.0 * h);
        assert!((g - exact).abs() < 1e-5, "gelu'({v}) = {g}, expected {exact}");
    }
}

#[test]
fn channel_layer_norm_matches_reference() {
    let mut rng = Rng::new(6);
    let x = rng.arr(&[2, 3, 4, 5, 6], 1.5);
    let w = rng.arr(&[6], 1.0);
    let b = rng.arr(&[6], 1.0);
    let expected = reference::layer_norm(&x, Some((&w.data, &b.data)), 1e-5);
    let affine = |t: &[Tensor]| channel_layer_norm(&t[0], Some((&t[1], &t[2])), 1e-5);
    check_against_reference("layer_norm affine", &[&x, &w, &b], &expected, affine);
    check_gradients("layer_norm affine", &[&x, &w, &b], 16, affine);
    let plain = |t: &[Tensor]| channel_layer_norm(&t[0], None, 1e-5);
    check_against_reference("layer_norm plain", &[&x], &reference::layer_norm(&x, None, 1e-5), plain);
    check_gradients("layer_norm plain", &[&x], 17, plain);
}

#[test]
fn window_partition_reverse_and_roll() {
    let mut rng = Rng::new(7);
    let x = rng.arr(&[2, 6, 4, 9, 3], 1.0);
    let ws = [3, 2, 3];
    check_against_reference("window_partition", &[&x], &reference::window_partition(&x, ws), |t| {
        window_partition(&t[0], ws)
    });
    let wins = reference::window_partition(&x, ws);
    check_against_reference("window_reverse", &[&wins], &x, |t| window_reverse(&t[0], ws, [6, 4, 9]));
    let shift = [-1, 2, -4];
    check_against_reference("roll", &[&x], &reference::roll(&x, shift.map(|s| s as isize)), |t| {
        roll_spatial(&t[0], shift)
    });
    let scale = rng.arr(&[2 * 2 * 2 * 3, 18, 3], 1.0);
    check_gradients("shifted windows", &[&x, &scale], 18, |t| {
        let w = window_partition(&roll_spatial(&t[0], shift)?, ws)?;
        window_reverse(&(w * &t[1])?, ws, [6, 4, 9])
    });
}

#[test]
fn shift_mask_matches_python_slicing() {
    // (stage size, window): cubic, a clamped axis with zero shift (non-cubic inputs), window 5.
    for (dims, window) in [([14, 14, 14], 7), ([14, 4, 21], 7), ([8, 12, 3], 5), ([10, 15, 5], 5)] {
        let (ws, shift) = stage_window(dims, window, window / 2);
        assert_eq!((ws, shift), reference::window_for(dims, window), "window geometry for {dims:?}");
        let padded = [0, 1, 2].map(|a| dims[a].div_ceil(ws[a]) * ws[a]);
        let got = compute_shift_mask(padded, ws, shift, &Device::Cpu).unwrap();
        let expected = reference::shift_mask(padded, ws, shift);
        assert_eq!(got.dims(), expected.shape.as_slice());
        assert_eq!(values(&got), expected.data, "mask for stage {dims:?}, window {window}");
    }
}

#[test]
fn relative_position_index_is_sliced_from_the_full_window() {
    for (window, n) in [(7, 343), (7, 216), (7, 64), (5, 100), (4, 64)] {
        let got = relative_position_index(window, n);
        let expected: Vec<u32> = (0..n * n).map(|p| reference::rel_index(window, p / n, p % n) as u32).collect();
        assert_eq!(got, expected, "window {window}, {n} tokens");
    }
}

#[test]
fn window_attention_matches_reference() {
    let mut rng = Rng::new(8);
    let (images, nw, heads, n, d) = (2, 4, 2, 12, 3);
    let q = rng.arr(&[images * nw, heads, n, d], 1.0);
    let k = rng.arr(&[images * nw, heads, n, d], 1.0);
    let v = rng.arr(&[images * nw, heads, n, d], 1.0);
    let bias = rng.arr(&[heads, n, n], 1.0);
    let mut mask = Arr::zeros(&[nw, n, n]);
    mask.data.iter_mut().for_each(|m| *m = if rng.uniform() > 0.3 { 0.0 } else { -100.0 });
    let mut expected = Arr::zeros(q.shape.as_slice());
    for win in 0..images * nw {
        for h in 0..heads {
            let rows =
                |a: &Arr| (0..n).map(|i| (0..d).map(|e| a.at(&[win, h, i, e])).collect::<Vec<_>>()).collect::<Vec<_>>();
            let o = reference::attention_head(&rows(&q), &rows(&k), &rows(&v), |i, j| {
                bias.at(&[h, i, j]) + mask.at(&[win % nw, i, j])
            });
            for i in 0..n {
                for e in 0..d {
                    expected.set(&[win, h, i, e], o[i][e]);
                }
            }
        }
    }
    // Budgets of one whole image, three windows (chunks straddle nothing but end unevenly), and one.
    for max_scores in [usize::MAX, 3 * heads * n * n, 1] {
        let op = |t: &[Tensor]| window_attention_chunked(&t[0], &t[1], &t[2], &t[3], Some(&t[4]), max_scores);
        check_against_reference("window_attention", &[&q, &k, &v, &bias, &mask], &expected, op);
    }
    let small = |rng: &mut Rng| rng.arr(&[2 * 2, 2, 5, 2], 1.0);
    let (q, k, v) = (small(&mut rng), small(&mut rng), small(&mut rng));
    let bias = rng.arr(&[2, 5, 5], 1.0);
    let mut mask = Arr::zeros(&[2, 5, 5]);
    mask.data.iter_mut().for_each(|m| *m = if rng.uniform() > 0.3 { 0.0 } else { -100.0 });
    let mask_t = tensor(&mask, DType::F64);
    check_gradients("window_attention", &[&q, &k, &v, &bias], 19, |t| {
        window_attention_chunked(&t[0], &t[1], &t[2], &t[3], Some(&mask_t), 2 * 5 * 5)
    });
}

/// The fused window gather and scatter (inference) against the composed pad / roll / partition
/// and reverse / roll / crop / add (what gradients are recorded through): equal bit for bit, with
/// padding on every axis, with and without a shift, in f32 and f64.
#[test]
fn fused_window_gather_and_scatter_equal_the_composed_ops() {
    use prosam_models::ops::window_gather::{add_reversed_shifted, partition_shifted};
    let mut rng = Rng::new(41);
    let (ws, padded) = ([3, 3, 3], [6, 6, 9]);
    let x = rng.arr(&[2, 5, 6, 7, 4], 1.0);
    let attended = rng.arr(&[2 * 2 * 2 * 3, 27, 4], 1.0);
    for dtype in [DType::F32, DType::F64] {
        for shift in [[0, 0, 0], [1, 1, 1], [2, 0, 1]] {
            let (xt, at) = (tensor(&x, dtype), tensor(&attended, dtype));
            let (xv, av) = (Var::from_tensor(&xt).unwrap(), Var::from_tensor(&at).unwrap());
            let bits = |t: &Tensor| values(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let fused = partition_shifted(&xt, ws, padded, shift).unwrap();
            let composed = partition_shifted(xv.as_tensor(), ws, padded, shift).unwrap();
            assert_eq!(fused.dims(), composed.dims());
            assert_eq!(bits(&fused), bits(&composed), "partition {shift:?} {dtype:?}");
            let fused = add_reversed_shifted(&xt, &at, ws, padded, shift).unwrap();
            let composed = add_reversed_shifted(xv.as_tensor(), av.as_tensor(), ws, padded, shift).unwrap();
            assert_eq!(fused.dims(), composed.dims());
            assert_eq!(bits(&fused), bits(&composed), "add reversed {shift:?} {dtype:?}");
        }
    }
}

#[test]
fn window_attention_from_qkv_matches_reference() {
    // MONAI's layout: qkv (windows, n, 3C), C = heads * d, q scaled by d^-0.5; heads concatenated out.
    // 10 tokens: one full 8-lane chunk and a remainder in the f32 kernel; 27 tokens of 8 channels
    // per head: three chunks and a remainder; 16 tokens: whole chunks only; heads of 6 channels:
    // the portable kernel (the AVX2 one has heads of 4 and 8).
    for (seed, heads, n, d) in [(9, 3, 10, 4), (10, 2, 27, 8), (11, 2, 16, 4), (12, 2, 13, 6)] {
        window_attention_from_qkv_case(seed, heads, n, d);
    }
}

fn window_attention_from_qkv_case(seed: u64, heads: usize, n: usize, d: usize) {
    let mut rng = Rng::new(seed);
    let (images, nw) = (2, 3);
    let c = heads * d;
    let windows = images * nw;
    let qkv = rng.arr(&[windows, n, 3 * c], 1.0);
    let bias = rng.arr(&[heads, n, n], 1.0);
    // Shift regions: window 0 of one region (no mask at all), the others of up to three.
    let regions: Vec<u32> =
        (0..nw * n).map(|i| if i < n { 1 } else { (rng.uniform() * 3.0).min(2.0) as u32 }).collect();
    let masked_score = |win: usize, i: usize, j: usize| {
        if regions[(win % nw) * n + i] == regions[(win % nw) * n + j] { 0.0 } else { -100.0 }
    };
    let scale = (d as f64).powf(-0.5);
    for masked in [false, true] {
        let mut expected = Arr::zeros(&[windows, n, c]);
        for win in 0..windows {
            for h in 0..heads {
                let part = |p: usize, s: f64| -> Vec<Vec<f64>> {
                    (0..n).map(|t| (0..d).map(|e| qkv.at(&[win, t, p * c + h * d + e]) * s).collect()).collect()
                };
                let o = reference::attention_head(&part(0, scale), &part(1, 1.0), &part(2, 1.0), |i, j| {
                    bias.at(&[h, i, j]) + if masked { masked_score(win, i, j) } else { 0.0 }
                });
                for i in 0..n {
                    for e in 0..d {
                        expected.set(&[win, i, h * d + e], o[i][e]);
                    }
                }
            }
        }
        let regions = masked.then(|| Tensor::from_vec(regions.clone(), (nw, n), &Device::Cpu).unwrap());
        check_against_reference("window_attention_qkv", &[&qkv, &bias], &expected, |t| {
            window_attention_qkv(&t[0], heads, scale, &t[1], regions.as_ref())
        });
        check_gradients("window_attention_qkv", &[&qkv, &bias], 20, |t| {
            window_attention_qkv(&t[0], heads, scale, &t[1], regions.as_ref())
        });
    }
}

#[test]
fn int8_convolution_and_linear_stay_close_to_the_reference() {
    use prosam_models::ops::conv3d_weight;
    use prosam_models::ops::quantized::{Q8Matrix, Weight};
    let mut rng = Rng::new(21);
    let x = rng.arr(&[1, 20, 6, 5, 7], 1.0);
    let w = rng.arr(&[8, 20, 3, 3, 3], 0.1);
    let expected = reference::conv3d(&x, &w, None, 1, 1);
    let (q, bytes) = Q8Matrix::quantize(&tensor(&w, DType::F32).reshape((8, ())).unwrap()).unwrap();
    assert_eq!(bytes.len(), 8 * 544 / 32 * 34, "20 x 27 = 540 columns pad to 544");
    let y = conv3d_weight(&tensor(&x, DType::F32), &Weight::Q8(std::sync::Arc::new(q)), [3; 3], None, 1).unwrap();
    let scale = expected.data.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = expected.max_abs_diff(&values(&y)) / scale;
    eprintln!("int8 conv3d: max error {:.3}% of the output range", err * 100.0);
    assert!(err < 0.02, "int8 conv3d max relative error {err}");

    let x2 = rng.arr(&[50, 40], 1.0);
    let w2 = rng.arr(&[9, 40], 0.2);
    let (q2, _) = Q8Matrix::quantize(&tensor(&w2, DType::F32)).unwrap();
    let y2 = values(&q2.forward(&tensor(&x2, DType::F32)).unwrap());
    let exact = reference::linear(&x2, &w2, None);
    let scale = exact.data.iter().fold(0f64, |m, v| m.max(v.abs()));
    let err = exact.max_abs_diff(&y2) / scale;
    assert!(err < 0.02, "int8 linear max relative error {err}");

    // The widened weights GPUs compute with: each value within half a quantization step of the
    // original (step = the block's max |w| / 127, its scale rounded to f16), the padding dropped.
    let widened = q2.dequantize();
    assert_eq!(widened.len(), 9 * 40);
    for r in 0..9 {
        for (b, block) in (0..40).collect::<Vec<_>>().chunks(32).enumerate() {
            let max = block.iter().map(|&c| w2.data[r * 40 + c].abs()).fold(0f64, f64::max);
            for &c in block {
                let d = (widened[r * 40 + c] as f64 - w2.data[r * 40 + c]).abs();
                assert!(d <= max / 127.0 * 0.5 + max * 1e-3, "row {r} block {b} col {c}: off by {d}");
            }
        }
    }
}

#[test]
fn depthwise_conv3d_matches_reference() {
    let mut rng = Rng::new(40);
    let x = rng.arr(&[1, 3, 4, 5, 6], 1.0);
    let w = rng.arr(&[3, 1, 3, 3, 3], 0.3);
    let b = rng.arr(&[3], 0.5);
    let expected = reference::depthwise_conv3d(&x, &w, Some(&b.data), 1);
    let op = |t: &[Tensor]| depthwise_conv3d(&t[0], &t[1], Some(&t[2]), 1);
    check_against_reference("depthwise conv3d", &[&x, &w, &b], &expected, op);
    check_gradients("depthwise conv3d", &[&x, &w, &b], 41, op);
}

#[test]
fn trilinear_interpolation_matches_pytorch_formula() {
    let mut rng = Rng::new(42);
    let x = rng.arr(&[1, 2, 3, 4, 5], 1.0);
    // The teacher's three uses: x4 and x0.5 without corners, x2 with corners; and odd sizes.
    for (size, align) in
        [([12, 16, 20], false), ([2, 2, 3], false), ([6, 8, 10], true), ([5, 7, 3], true), ([7, 3, 9], false)]
    {
        let expected = reference::trilinear(&x, size, align);
        let op = |t: &[Tensor]| interpolate_linear(&t[0], &size, align);
        check_against_reference(&format!("trilinear {size:?} align {align}"), &[&x], &expected, op);
    }
    let small = rng.arr(&[1, 1, 2, 3, 2], 1.0);
    check_gradients("trilinear", &[&small], 43, |t| interpolate_linear(&t[0], &[4, 5, 4], true));
}

#[test]
fn max_pool3d_matches_reference() {
    let mut rng = Rng::new(44);
    let x = rng.arr(&[2, 3, 4, 6, 2], 1.0);
    let expected = reference::max_pool3d(&x, 2);
    check_against_reference("max_pool3d", &[&x], &expected, |t| max_pool3d(&t[0], 2));
    check_gradients("max_pool3d", &[&x], 45, |t| max_pool3d(&t[0], 2));
}
