//! Vector building blocks for the f32 CPU kernels, written as plain loops over 8-lane arrays that
//! LLVM turns into SIMD code. Every helper is `#[inline(always)]` and generic over `FMA`, so that a
//! kernel compiled inside a `#[target_feature(enable = "avx2,fma")]` function gets 256-bit fused
//! multiply-adds, and the same kernel compiled for the baseline target gets SSE2 multiply + add
//! (`f32::mul_add` without hardware FMA would call libm, which is slow).
//!
//! [`Isa::detect`] picks the variant once per call; on aarch64 NEON with FMA is the baseline.

/// Lanes per accumulator: one AVX register of f32.
pub(crate) const LANES: usize = 8;

/// The instruction set a kernel was compiled for, chosen at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// x86-64 with AVX2 and FMA.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    Avx2Fma,
    /// The compile target's baseline (SSE2 on x86-64; NEON with FMA on aarch64).
    Baseline,
}

impl Isa {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx2Fma;
        }
        Isa::Baseline
    }
}

/// Whether the baseline target has a hardware fused multiply-add.
pub(crate) const BASELINE_FMA: bool = cfg!(target_arch = "aarch64");

/// `a * b + c`, fused where the kernel was compiled with FMA.
#[inline(always)]
pub(crate) fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `sum(a * b)`, accumulated in 8 lanes (so the result differs from a sequential sum by rounding).
#[inline(always)]
pub(crate) fn dot<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut acc = [0f32; LANES];
    let (a8, b8) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_rest, b_rest) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..LANES {
            acc[l] = madd::<FMA>(x[l], y[l], acc[l]);
        }
    }
    let mut total = acc.iter().sum::<f32>();
    for (x, y) in a_rest.iter().zip(b_rest) {
        total = madd::<FMA>(*x, *y, total);
    }
    total
}

/// `e^x` for `x <= 0` (the shifted scores of a softmax), within 2 ulp of the exact value down to
/// about -87 and flushed to zero below: Cephes' `expf` (range reduction by ln 2 in two parts and a
/// degree-6 polynomial) with branch-free rounding, so that it vectorises.
#[inline(always)]
pub(crate) fn exp_nonpositive<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer held in the mantissa's low bits.
    const ROUND: f32 = 12_582_912.0;
    const ROUND_BITS: i32 = 0x4B40_0000;
    // A comparison, not `f32::max`, so that a NaN stays NaN.
    let xc = if x < -87.0 { -87.0 } else { x };
    let t = madd::<FMA>(xc, LOG2E, ROUND);
    let n = t - ROUND;
    let r = madd::<FMA>(n, -LN2_LO, madd::<FMA>(n, -LN2_HI, xc));
    let mut p = 1.987_569_1e-4;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let e = madd::<FMA>(p, r * r, r) + 1.0;
    let k = (t.to_bits() as i32).wrapping_sub(ROUND_BITS);
    let scale = f32::from_bits(((k + 127) << 23) as u32);
    if x < -87.0 { 0.0 } else { e * scale }
}

/// [`exp_nonpositive`] on 8 lanes in AVX2 + FMA intrinsics, the same operations in the same order
/// (bit-equal to the scalar form with FMA).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp_nonpositive_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let c = _mm256_set1_ps;
    // MAXPS returns its second operand when either is NaN: a NaN stays NaN, as in the scalar form.
    let xc = _mm256_max_ps(c(-87.0), x);
    let t = _mm256_fmadd_ps(xc, c(std::f32::consts::LOG2_E), c(12_582_912.0));
    let n = _mm256_sub_ps(t, c(12_582_912.0));
    let r = _mm256_fmadd_ps(n, c(2.121_944_4e-4), _mm256_fmadd_ps(n, c(-0.693_359_4), xc));
    let mut p = c(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, c(1.398_199_9e-3));
    p = _mm256_fmadd_ps(p, r, c(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, c(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, c(1.666_666_5e-1));
    p = _mm256_fmadd_ps(p, r, c(0.5));
    let e = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), c(1.0));
    let k = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B40_0000));
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(k, _mm256_set1_epi32(127))));
    let underflow = _mm256_cmp_ps::<_CMP_LT_OQ>(x, c(-87.0));
    _mm256_andnot_ps(underflow, _mm256_mul_ps(e, scale))
}

/// [`exp_nonpositive`] on 16 lanes in AVX-512F intrinsics, the same operations in the same order
/// (bit-equal to the scalar form with FMA).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp_nonpositive_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let c = _mm512_set1_ps;
    // MAXPS returns its second operand when either is NaN: a NaN stays NaN, as in the scalar form.
    let xc = _mm512_max_ps(c(-87.0), x);
    let t = _mm512_fmadd_ps(xc, c(std::f32::consts::LOG2_E), c(12_582_912.0));
    let n = _mm512_sub_ps(t, c(12_582_912.0));
    let r = _mm512_fmadd_ps(n, c(2.121_944_4e-4), _mm512_fmadd_ps(n, c(-0.693_359_4), xc));
    let mut p = c(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, c(1.398_199_9e-3));
    p = _mm512_fmadd_ps(p, r, c(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, c(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, c(1.666_666_5e-1));
    p = _mm512_fmadd_ps(p, r, c(0.5));
    let e = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), c(1.0));
    let k = _mm512_sub_epi32(_mm512_castps_si512(t), _mm512_set1_epi32(0x4B40_0000));
    let scale = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(k, _mm512_set1_epi32(127))));
    let underflow = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, c(-87.0));
    _mm512_maskz_mov_ps(!underflow, _mm512_mul_ps(e, scale))
}

/// `x[i] = e^(x[i] - shift)` for `x[i] <= shift`; returns the sum of the new values. A plain map
/// (which LLVM's loop vectoriser handles) followed by a lane sum.
#[inline(always)]
pub(crate) fn exp_shifted_sum<const FMA: bool>(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp_nonpositive::<FMA>(*v - shift);
    }
    sum(x)
}

/// The sum of `x`, accumulated in 8 lanes.
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// `erf(x)` in f32, within a few ulp: the rational approximation of Eigen and XLA (odd degree-13
/// numerator over a degree-8 even denominator on `[-4, 4]`, where `erf` reaches 1 in f32).
#[inline(always)]
pub(crate) fn erf<const FMA: bool>(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10;
    p = madd::<FMA>(p, x2, 2.770_681_4e-8);
    p = madd::<FMA>(p, x2, -2.101_024e-6);
    p = madd::<FMA>(p, x2, -5.692_506_4e-5);
    p = madd::<FMA>(p, x2, -7.349_906_3e-4);
    p = madd::<FMA>(p, x2, -2.954_6e-3);
    p = madd::<FMA>(p, x2, -1.609_603_3e-2);
    let mut q = -1.456_607_2e-5;
    q = madd::<FMA>(q, x2, -2.133_740_6e-4);
    q = madd::<FMA>(q, x2, -1.682_827e-3);
    q = madd::<FMA>(q, x2, -7.373_329e-3);
    q = madd::<FMA>(q, x2, -1.426_473_9e-2);
    x * p / q
}

/// `GELU(x) = x / 2 * (1 + erf(x / sqrt 2))`, PyTorch's exact (erf) form.
#[inline(always)]
pub(crate) fn gelu_erf<const FMA: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf::<FMA>(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_on_the_softmax_range() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            for fma in [false, true] {
                let got = if fma { exp_nonpositive::<true>(x) } else { exp_nonpositive::<false>(x) } as f64;
                let exact = (x as f64).exp();
                let ulp = (exact as f32).to_bits().abs_diff((got as f32).to_bits());
                worst = worst.max(ulp as f64);
            }
        }
        assert!(worst <= 2.0, "exp is {worst} ulp off");
        assert_eq!(exp_nonpositive::<false>(-100.0), 0.0);
        assert_eq!(exp_nonpositive::<false>(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive::<true>(0.0), 1.0);
        assert!(exp_nonpositive::<true>(f32::NAN).is_nan());
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_equals_the_scalar_form_bit_for_bit() {
        use std::arch::x86_64::*;
        if Isa::detect() != Isa::Avx2Fma {
            eprintln!("skipped: no AVX2 + FMA on this CPU");
            return;
        }
        let mut xs: Vec<f32> = (0..=100_000).map(|i| -90.0 * i as f32 / 100_000.0).collect();
        xs.extend([0.0, -0.0, -87.0, -87.000_01, -100.0, f32::NEG_INFINITY, f32::NAN, f32::MIN_POSITIVE]);
        while !xs.len().is_multiple_of(2 * LANES) {
            xs.push(-1.0);
        }
        for chunk in xs.chunks_exact(LANES) {
            let mut got = [0f32; LANES];
            // SAFETY: AVX2 and FMA were detected; loads and stores of 8 floats from 8-float arrays.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp_nonpositive_avx2(_mm256_loadu_ps(chunk.as_ptr()))) };
            for (x, g) in chunk.iter().zip(got) {
                let want = exp_nonpositive::<true>(*x);
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "e^{x}: {g} vs {want}");
            }
        }
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped the 16-lane form: no AVX-512F on this CPU");
            return;
        }
        for chunk in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F was detected; loads and stores of 16 floats from 16-float arrays.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp_nonpositive_avx512(_mm512_loadu_ps(chunk.as_ptr()))) };
            for (x, g) in chunk.iter().zip(got) {
                let want = exp_nonpositive::<true>(*x);
                assert!(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), "e^{x}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn erf_and_gelu_are_within_a_few_ulp() {
        // erf by its Maclaurin series, exact to f64 rounding for |x| < 3; above, erfc(x) < 2e-5.
        let erf64 = |x: f64| -> f64 {
            if x.abs() >= 3.0 {
                return x.signum() * (1.0 - libm_erfc_tail(x.abs()));
            }
            let (mut term, mut sum) = (x, x);
            for n in 1..200 {
                term *= -x * x / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut worst_erf = 0f64;
        let mut worst_gelu = 0f64;
        for i in -60_000..=60_000 {
            let x = i as f32 / 10_000.0;
            let exact = erf64(x as f64);
            worst_erf = worst_erf.max((erf::<true>(x) as f64 - exact).abs());
            worst_erf = worst_erf.max((erf::<false>(x) as f64 - exact).abs());
            let gelu = 0.5 * x as f64 * (1.0 + erf64(x as f64 / 2f64.sqrt()));
            // Absolute, scaled by |x|: for x << 0 the f32 formula (PyTorch's too) loses the
            // tiny value to cancellation in 1 + erf.
            let err = (gelu_erf::<true>(x) as f64 - gelu).abs() / (x as f64).abs().max(1.0);
            worst_gelu = worst_gelu.max(err);
        }
        assert!(worst_erf < 5e-7, "erf off by {worst_erf:e}");
        assert!(worst_gelu < 5e-7, "gelu off by {worst_gelu:e} (times max(1, |x|))");
        assert!((erf::<false>(10.0) - 1.0).abs() < 2e-7 && (erf::<false>(-10.0) + 1.0).abs() < 2e-7);
    }

    /// erfc(x) for x >= 3 by its continued fraction.
    fn libm_erfc_tail(x: f64) -> f64 {
        let mut f = 0.0;
        for n in (1..60).rev() {
            f = n as f64 / 2.0 / (x + f);
        }
        (-x * x).exp() / std::f64::consts::PI.sqrt() / (x + f)
    }

    #[test]
    fn lane_reductions_match_sequential_sums() {
        for len in [0, 1, 7, 8, 9, 31, 32, 33, 343] {
            let a: Vec<f32> = (0..len).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.25).collect();
            let b: Vec<f32> = (0..len).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot::<false>(&a, &b) as f64 - exact).abs() < 1e-4, "dot of {len}");
            let m = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut e = a.clone();
            let total = exp_shifted_sum::<false>(&mut e, m);
            let exact_total: f64 = a.iter().map(|v| ((*v - m) as f64).exp()).sum();
            assert!((total as f64 - exact_total).abs() < 1e-5 * exact_total.max(1.0), "exp sum of {len}");
        }
    }
}
