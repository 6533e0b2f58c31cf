//! Naive, loop-based f64 reference implementations of SwinUNETR's ops and of the whole network,
//! written from `../shared/spec/swinunetr.md` (MONAI 1.6.1). Nothing here imports the code under
//! test: every op is re-derived from its definition with explicit index arithmetic, slow but plain.
#![allow(dead_code)]

use std::collections::HashMap;

/// A dense row-major f64 array.
#[derive(Debug, Clone, PartialEq)]
pub struct Arr {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Arr {
    pub fn zeros(shape: &[usize]) -> Self {
        Self { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }

    pub fn new(shape: &[usize], data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape: shape.to_vec(), data }
    }

    fn offset(&self, ix: &[usize]) -> usize {
        assert_eq!(ix.len(), self.shape.len());
        ix.iter().zip(&self.shape).fold(0, |acc, (&i, &d)| {
            assert!(i < d, "index {ix:?} out of {:?}", self.shape);
            acc * d + i
        })
    }

    pub fn at(&self, ix: &[usize]) -> f64 {
        self.data[self.offset(ix)]
    }

    pub fn set(&mut self, ix: &[usize], v: f64) {
        let o = self.offset(ix);
        self.data[o] = v;
    }

    pub fn max_abs_diff(&self, other: &[f64]) -> f64 {
        assert_eq!(self.data.len(), other.len());
        self.data.iter().zip(other).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    }
}

/// SplitMix64: a small deterministic generator for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }

    pub fn arr(&mut self, shape: &[usize], scale: f64) -> Arr {
        Arr::new(shape, self.vec(shape.iter().product(), scale))
    }
}

// ---------------------------------------------------------------------------------------------
// Convolutions (channels-first volumes).

/// Cross-correlation: `x [B,C,D,H,W]`, `w [O,C,kd,kh,kw]`, zero padding `pad`, stride `stride`.
pub fn conv3d(x: &Arr, w: &Arr, bias: Option<&[f64]>, pad: usize, stride: usize) -> Arr {
    let (b, c, d, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]);
    let (o, kd, kh, kw) = (w.shape[0], w.shape[2], w.shape[3], w.shape[4]);
    assert_eq!(w.shape[1], c);
    let out_len = |n: usize, k: usize| (n + 2 * pad - k) / stride + 1;
    let (od, oh, ow) = (out_len(d, kd), out_len(h, kh), out_len(wd, kw));
    let mut y = Arr::zeros(&[b, o, od, oh, ow]);
    let mut yi = 0;
    for bb in 0..b {
        for oo in 0..o {
            for i in 0..od {
                for j in 0..oh {
                    for l in 0..ow {
                        let mut acc = bias.map_or(0.0, |bs| bs[oo]);
                        for cc in 0..c {
                            for a in 0..kd {
                                let z = (i * stride + a) as isize - pad as isize;
                                if z < 0 || z >= d as isize {
                                    continue;
                                }
                                for bq in 0..kh {
                                    let yy = (j * stride + bq) as isize - pad as isize;
                                    if yy < 0 || yy >= h as isize {
                                        continue;
                                    }
                                    for cq in 0..kw {
                                        let xx = (l * stride + cq) as isize - pad as isize;
                                        if xx < 0 || xx >= wd as isize {
                                            continue;
                                        }
                                        let xv = x.data
                                            [(((bb * c + cc) * d + z as usize) * h + yy as usize) * wd + xx as usize];
                                        let wv = w.data[(((oo * c + cc) * kd + a) * kh + bq) * kw + cq];
                                        acc += xv * wv;
                                    }
                                }
                            }
                        }
                        y.data[yi] = acc;
                        yi += 1;
                    }
                }
            }
        }
    }
    y
}

/// Transposed convolution with kernel == stride `k`: `x [B,C,D,H,W]`, `w [C,O,k,k,k]`.
pub fn conv_transpose3d(x: &Arr, w: &Arr, bias: Option<&[f64]>, k: usize) -> Arr {
    let (b, c, d, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]);
    let o = w.shape[1];
    let mut y = Arr::zeros(&[b, o, d * k, h * k, wd * k]);
    for bb in 0..b {
        for oo in 0..o {
            for i in 0..d * k {
                for j in 0..h * k {
                    for l in 0..wd * k {
                        let mut acc = bias.map_or(0.0, |bs| bs[oo]);
                        for cc in 0..c {
                            acc += x.at(&[bb, cc, i / k, j / k, l / k]) * w.at(&[cc, oo, i % k, j % k, l % k]);
                        }
                        y.set(&[bb, oo, i, j, l], acc);
                    }
                }
            }
        }
    }
    y
}

// ---------------------------------------------------------------------------------------------
// Norms and activations.

/// Per (sample, channel) normalisation over the spatial axes, biased variance.
pub fn instance_norm(x: &Arr, eps: f64) -> Arr {
    let (b, c) = (x.shape[0], x.shape[1]);
    let n: usize = x.shape[2..].iter().product();
    let mut y = x.clone();
    for g in 0..b * c {
        let s = &x.data[g * n..(g + 1) * n];
        let mean = s.iter().sum::<f64>() / n as f64;
        let var = s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        for (dst, v) in y.data[g * n..(g + 1) * n].iter_mut().zip(s) {
            *dst = (v - mean) / (var + eps).sqrt();
        }
    }
    y
}

/// Layer norm over the last axis, with optional affine `(weight, bias)`.
pub fn layer_norm(x: &Arr, affine: Option<(&[f64], &[f64])>, eps: f64) -> Arr {
    let c = *x.shape.last().unwrap();
    let mut y = x.clone();
    for (src, dst) in x.data.chunks(c).zip(y.data.chunks_mut(c)) {
        let mean = src.iter().sum::<f64>() / c as f64;
        let var = src.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
        for ch in 0..c {
            let mut v = (src[ch] - mean) / (var + eps).sqrt();
            if let Some((w, b)) = affine {
                v = v * w[ch] + b[ch];
            }
            dst[ch] = v;
        }
    }
    y
}

pub fn leaky_relu(x: &Arr, slope: f64) -> Arr {
    Arr::new(&x.shape, x.data.iter().map(|&v| if v >= 0.0 { v } else { v * slope }).collect())
}

/// erf by its Maclaurin series (|x| < 3) or continued fraction (|x| >= 3): good to ~1e-15.
pub fn erf(x: f64) -> f64 {
    if x.abs() < 3.0 {
        let mut term = x;
        let mut sum = x;
        let mut k = 0.0;
        loop {
            k += 1.0;
            term *= -x * x / k;
            let add = term / (2.0 * k + 1.0);
            sum += add;
            if add.abs() < 1e-17 * sum.abs().max(1e-300) {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...)))), Lentz-free backward evaluation.
        let ax = x.abs();
        let mut f = ax;
        for k in (1..60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        let erfc = (-ax * ax).exp() / std::f64::consts::PI.sqrt() / f;
        (1.0 - erfc) * x.signum()
    }
}

pub fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + erf(v / std::f64::consts::SQRT_2))
}

/// `x [N, in] -> [N, out]` with `w [out, in]`.
pub fn linear(x: &Arr, w: &Arr, b: Option<&[f64]>) -> Arr {
    let inn = *x.shape.last().unwrap();
    let out = w.shape[0];
    assert_eq!(w.shape[1], inn);
    let rows = x.data.len() / inn;
    let mut y = Vec::with_capacity(rows * out);
    for r in 0..rows {
        let xr = &x.data[r * inn..(r + 1) * inn];
        for o in 0..out {
            let wr = &w.data[o * inn..(o + 1) * inn];
            y.push(b.map_or(0.0, |b| b[o]) + xr.iter().zip(wr).map(|(a, b)| a * b).sum::<f64>());
        }
    }
    let mut shape = x.shape.clone();
    *shape.last_mut().unwrap() = out;
    Arr::new(&shape, y)
}

// ---------------------------------------------------------------------------------------------
// Windows (channels-last `[B, D, H, W, C]`).

/// Window edge and shift per axis (MONAI's get_window_size).
pub fn window_for(dims: [usize; 3], window: usize) -> ([usize; 3], [usize; 3]) {
    let mut ws = [window; 3];
    let mut sh = [window / 2; 3];
    for a in 0..3 {
        if dims[a] <= window {
            ws[a] = dims[a];
            sh[a] = 0;
        }
    }
    (ws, sh)
}

/// Token `t` of window `win` of a padded grid `[Dp, Hp, Wp]` as grid coordinates.
pub fn window_token_coord(padded: [usize; 3], ws: [usize; 3], win: usize, t: usize) -> [usize; 3] {
    let counts = [padded[0] / ws[0], padded[1] / ws[1], padded[2] / ws[2]];
    let wc = [win / (counts[1] * counts[2]), (win / counts[2]) % counts[1], win % counts[2]];
    let tc = [t / (ws[1] * ws[2]), (t / ws[2]) % ws[1], t % ws[2]];
    [wc[0] * ws[0] + tc[0], wc[1] * ws[1] + tc[1], wc[2] * ws[2] + tc[2]]
}

/// `[B, Dp, Hp, Wp, C] -> [B * nW, n, C]`.
pub fn window_partition(x: &Arr, ws: [usize; 3]) -> Arr {
    let (b, c) = (x.shape[0], x.shape[4]);
    let padded = [x.shape[1], x.shape[2], x.shape[3]];
    let nw = (padded[0] / ws[0]) * (padded[1] / ws[1]) * (padded[2] / ws[2]);
    let n = ws[0] * ws[1] * ws[2];
    let mut y = Arr::zeros(&[b * nw, n, c]);
    for bb in 0..b {
        for win in 0..nw {
            for t in 0..n {
                let [i, j, k] = window_token_coord(padded, ws, win, t);
                for ch in 0..c {
                    y.set(&[bb * nw + win, t, ch], x.at(&[bb, i, j, k, ch]));
                }
            }
        }
    }
    y
}

/// `[B * nW, n, C] -> [B, Dp, Hp, Wp, C]`.
pub fn window_reverse(wins: &Arr, ws: [usize; 3], padded: [usize; 3]) -> Arr {
    let (bn, n, c) = (wins.shape[0], wins.shape[1], wins.shape[2]);
    let nw = (padded[0] / ws[0]) * (padded[1] / ws[1]) * (padded[2] / ws[2]);
    let b = bn / nw;
    let mut y = Arr::zeros(&[b, padded[0], padded[1], padded[2], c]);
    for bb in 0..b {
        for win in 0..nw {
            for t in 0..n {
                let [i, j, k] = window_token_coord(padded, ws, win, t);
                for ch in 0..c {
                    y.set(&[bb, i, j, k, ch], wins.at(&[bb * nw + win, t, ch]));
                }
            }
        }
    }
    y
}

/// torch.roll over axes 1..=3 of `[B, D, H, W, C]`: the element at p moves to p + shift (mod size).
pub fn roll(x: &Arr, shift: [isize; 3]) -> Arr {
    let (b, d, h, w, c) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]);
    let mut y = Arr::zeros(&x.shape);
    let wrap = |p: usize, s: isize, n: usize| ((p as isize + s).rem_euclid(n as isize)) as usize;
    for bb in 0..b {
        for i in 0..d {
            for j in 0..h {
                for k in 0..w {
                    for ch in 0..c {
                        y.set(
                            &[bb, wrap(i, shift[0], d), wrap(j, shift[1], h), wrap(k, shift[2], w), ch],
                            x.at(&[bb, i, j, k, ch]),
                        );
                    }
                }
            }
        }
    }
    y
}

/// Which of the three shift regions coordinate `p` of an axis of length `len` falls in, as the
/// Python slices `[:-w]`, `[-w:-s]`, `[-s:]` assign them in that order (later ones overwrite).
/// With `s = 0`, `[-0:]` is the whole axis, so every coordinate ends in the third region.
fn shift_region(p: usize, len: usize, w: usize, s: usize) -> usize {
    if s == 0 {
        return 2;
    }
    if p >= len - s {
        2
    } else if p >= len - w {
        1
    } else {
        0
    }
}

/// The shifted-window mask `[nW, n, n]`: 0 within a region, -100 across regions.
pub fn shift_mask(padded: [usize; 3], ws: [usize; 3], shift: [usize; 3]) -> Arr {
    let nw = (padded[0] / ws[0]) * (padded[1] / ws[1]) * (padded[2] / ws[2]);
    let n = ws[0] * ws[1] * ws[2];
    let label =
        |p: [usize; 3]| -> usize { (0..3).fold(0, |acc, a| acc * 3 + shift_region(p[a], padded[a], ws[a], shift[a])) };
    let mut m = Arr::zeros(&[nw, n, n]);
    for win in 0..nw {
        for i in 0..n {
            for j in 0..n {
                let li = label(window_token_coord(padded, ws, win, i));
                let lj = label(window_token_coord(padded, ws, win, j));
                m.set(&[win, i, j], if li == lj { 0.0 } else { -100.0 });
            }
        }
    }
    m
}

/// Relative-position table row for tokens i, j of a cubic window of edge `window` (coordinates
/// always taken in the full window, as MONAI's sliced index does).
pub fn rel_index(window: usize, i: usize, j: usize) -> usize {
    let co = |t: usize| [t / (window * window), (t / window) % window, t % window];
    let (a, b) = (co(i), co(j));
    let span = 2 * window - 1;
    let r = |x: usize| a[x] + window - 1 - b[x];
    (r(0) * span + r(1)) * span + r(2)
}

/// Attention of one head on one window: `q, k, v [n][d]` (q already scaled), `bias(i, j)` added.
pub fn attention_head(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    bias: impl Fn(usize, usize) -> f64,
) -> Vec<Vec<f64>> {
    let n = q.len();
    let d = v[0].len();
    let mut out = vec![vec![0.0; d]; n];
    for i in 0..n {
        let scores: Vec<f64> =
            (0..n).map(|j| q[i].iter().zip(&k[j]).map(|(a, b)| a * b).sum::<f64>() + bias(i, j)).collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let z: f64 = e.iter().sum();
        for j in 0..n {
            for x in 0..d {
                out[i][x] += e[j] / z * v[j][x];
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The network.

/// The reference network's options (plain numbers, so that nothing comes from the code under test).
#[derive(Debug, Clone)]
pub struct RefConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub feature_size: usize,
    pub depths: [usize; 4],
    pub heads: [usize; 4],
    pub window: usize,
    pub use_v2: bool,
    /// `mergingv2` (itertools.product order) instead of `merging`.
    pub merging_v2: bool,
    pub normalize: bool,
}

pub type Weights = HashMap<String, Arr>;

fn wt<'a>(w: &'a Weights, key: &str) -> &'a Arr {
    w.get(key).unwrap_or_else(|| panic!("reference: missing weight {key}"))
}

fn to_channels_last(x: &Arr) -> Arr {
    let (b, c, d, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]);
    let mut y = Arr::zeros(&[b, d, h, w, c]);
    for bb in 0..b {
        for ch in 0..c {
            for i in 0..d {
                for j in 0..h {
                    for k in 0..w {
                        y.set(&[bb, i, j, k, ch], x.at(&[bb, ch, i, j, k]));
                    }
                }
            }
        }
    }
    y
}

fn to_channels_first(x: &Arr) -> Arr {
    let (b, d, h, w, c) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]);
    let mut y = Arr::zeros(&[b, c, d, h, w]);
    for bb in 0..b {
        for ch in 0..c {
            for i in 0..d {
                for j in 0..h {
                    for k in 0..w {
                        y.set(&[bb, ch, i, j, k], x.at(&[bb, i, j, k, ch]));
                    }
                }
            }
        }
    }
    y
}

fn add(a: &Arr, b: &Arr) -> Arr {
    Arr::new(&a.shape, a.data.iter().zip(&b.data).map(|(x, y)| x + y).collect())
}

fn cat_channels(a: &Arr, b: &Arr) -> Arr {
    let (bs, ca, cb) = (a.shape[0], a.shape[1], b.shape[1]);
    let n: usize = a.shape[2..].iter().product();
    let mut shape = a.shape.clone();
    shape[1] = ca + cb;
    let mut data = Vec::with_capacity(bs * (ca + cb) * n);
    for bb in 0..bs {
        data.extend_from_slice(&a.data[bb * ca * n..(bb + 1) * ca * n]);
        data.extend_from_slice(&b.data[bb * cb * n..(bb + 1) * cb * n]);
    }
    Arr::new(&shape, data)
}

/// UnetResBlock under `prefix` (`prefix.conv1.conv.weight`, ...).
pub fn res_block(w: &Weights, prefix: &str, x: &Arr) -> Arr {
    let c1 = wt(w, &format!("{prefix}.conv1.conv.weight"));
    let c2 = wt(w, &format!("{prefix}.conv2.conv.weight"));
    let o = leaky_relu(&instance_norm(&conv3d(x, c1, None, 1, 1), 1e-5), 0.01);
    let o = instance_norm(&conv3d(&o, c2, None, 1, 1), 1e-5);
    let r = match w.get(&format!("{prefix}.conv3.conv.weight")) {
        Some(c3) => instance_norm(&conv3d(x, c3, None, 0, 1), 1e-5),
        None => x.clone(),
    };
    leaky_relu(&add(&o, &r), 0.01)
}

fn up_block(w: &Weights, prefix: &str, x: &Arr, skip: &Arr) -> Arr {
    let up = conv_transpose3d(x, wt(w, &format!("{prefix}.transp_conv.conv.weight")), None, 2);
    res_block(w, &format!("{prefix}.conv_block"), &cat_channels(&up, skip))
}

/// Window attention of block `prefix` on the padded, possibly rolled, channels-last grid `x`.
fn window_attention(
    w: &Weights,
    prefix: &str,
    x: &Arr,
    ws: [usize; 3],
    heads: usize,
    window: usize,
    mask: Option<&Arr>,
) -> Arr {
    let padded = [x.shape[1], x.shape[2], x.shape[3]];
    let wins = window_partition(x, ws);
    let (bn, n, c) = (wins.shape[0], wins.shape[1], wins.shape[2]);
    let nw = (padded[0] / ws[0]) * (padded[1] / ws[1]) * (padded[2] / ws[2]);
    let hd = c / heads;
    let qkv = linear(&wins, wt(w, &format!("{prefix}.qkv.weight")), Some(&wt(w, &format!("{prefix}.qkv.bias")).data));
    let table = wt(w, &format!("{prefix}.relative_position_bias_table"));
    let mut out = Arr::zeros(&[bn, n, c]);
    for win in 0..bn {
        for head in 0..heads {
            let take = |part: usize, scale: f64| -> Vec<Vec<f64>> {
                (0..n).map(|t| (0..hd).map(|e| qkv.at(&[win, t, part * c + head * hd + e]) * scale).collect()).collect()
            };
            let q = take(0, (hd as f64).powf(-0.5));
            let (k, v) = (take(1, 1.0), take(2, 1.0));
            let o = attention_head(&q, &k, &v, |i, j| {
                table.at(&[rel_index(window, i, j), head]) + mask.map_or(0.0, |m| m.at(&[win % nw, i, j]))
            });
            for t in 0..n {
                for e in 0..hd {
                    out.set(&[win, t, head * hd + e], o[t][e]);
                }
            }
        }
    }
    let out = linear(&out, wt(w, &format!("{prefix}.proj.weight")), Some(&wt(w, &format!("{prefix}.proj.bias")).data));
    window_reverse(&out, ws, padded)
}

fn ln(w: &Weights, prefix: &str, x: &Arr) -> Arr {
    layer_norm(x, Some((&wt(w, &format!("{prefix}.weight")).data, &wt(w, &format!("{prefix}.bias")).data)), 1e-5)
}

/// One Swin block on channels-last `x [B, D, H, W, C]`.
fn swin_block(w: &Weights, prefix: &str, x: &Arr, heads: usize, window: usize, shifted: bool) -> Arr {
    let (b, d, h, wd, c) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]);
    let (ws, stage_shift) = window_for([d, h, wd], window);
    let shift = if shifted { stage_shift } else { [0; 3] };
    let padded = [d.div_ceil(ws[0]) * ws[0], h.div_ceil(ws[1]) * ws[1], wd.div_ceil(ws[2]) * ws[2]];
    let normed = ln(w, &format!("{prefix}.norm1"), x);
    let mut grid = Arr::zeros(&[b, padded[0], padded[1], padded[2], c]);
    for bb in 0..b {
        for i in 0..d {
            for j in 0..h {
                for k in 0..wd {
                    for ch in 0..c {
                        grid.set(&[bb, i, j, k, ch], normed.at(&[bb, i, j, k, ch]));
                    }
                }
            }
        }
    }
    let any_shift = shift.iter().any(|&s| s > 0);
    let neg = [-(shift[0] as isize), -(shift[1] as isize), -(shift[2] as isize)];
    let mask = any_shift.then(|| shift_mask(padded, ws, shift));
    let rolled = if any_shift { roll(&grid, neg) } else { grid };
    let attended = window_attention(w, &format!("{prefix}.attn"), &rolled, ws, heads, window, mask.as_ref());
    let back = if any_shift { roll(&attended, shift.map(|s| s as isize)) } else { attended };
    let mut x1 = x.clone();
    for bb in 0..b {
        for i in 0..d {
            for j in 0..h {
                for k in 0..wd {
                    for ch in 0..c {
                        let v = x.at(&[bb, i, j, k, ch]) + back.at(&[bb, i, j, k, ch]);
                        x1.set(&[bb, i, j, k, ch], v);
                    }
                }
            }
        }
    }
    let hmid = linear(
        &ln(w, &format!("{prefix}.norm2"), &x1),
        wt(w, &format!("{prefix}.mlp.linear1.weight")),
        Some(&wt(w, &format!("{prefix}.mlp.linear1.bias")).data),
    );
    let hmid = Arr::new(&hmid.shape, hmid.data.iter().map(|&v| gelu(v)).collect());
    let mlp = linear(
        &hmid,
        wt(w, &format!("{prefix}.mlp.linear2.weight")),
        Some(&wt(w, &format!("{prefix}.mlp.linear2.bias")).data),
    );
    add(&x1, &mlp)
}

/// Patch merging of channels-last `x`: LN(8C) of the concatenated strided sub-volumes, then Linear(8C -> 2C).
pub fn patch_merging(w: &Weights, prefix: &str, x: &Arr, v2: bool) -> Arr {
    let (b, d, h, wd, c) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]);
    let (d2, h2, w2) = (d.div_ceil(2), h.div_ceil(2), wd.div_ceil(2));
    let offsets: [[usize; 3]; 8] = if v2 {
        [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
    } else {
        [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    };
    let mut cat = Arr::zeros(&[b, d2, h2, w2, 8 * c]);
    for bb in 0..b {
        for i in 0..d2 {
            for j in 0..h2 {
                for k in 0..w2 {
                    for (p, off) in offsets.iter().enumerate() {
                        let (si, sj, sk) = (2 * i + off[0], 2 * j + off[1], 2 * k + off[2]);
                        for ch in 0..c {
                            let v = if si < d && sj < h && sk < wd { x.at(&[bb, si, sj, sk, ch]) } else { 0.0 };
                            cat.set(&[bb, i, j, k, p * c + ch], v);
                        }
                    }
                }
            }
        }
    }
    linear(&ln(w, &format!("{prefix}.norm"), &cat), wt(w, &format!("{prefix}.reduction.weight")), None)
}

fn proj_out(x: &Arr, normalize: bool) -> Arr {
    if normalize { to_channels_first(&layer_norm(&to_channels_last(x), None, 1e-5)) } else { x.clone() }
}

/// The reference SwinUNETR forward pass: logits `[B, out, D, H, W]`.
pub fn swin_unetr(cfg: &RefConfig, w: &Weights, x: &Arr) -> Arr {
    let pe =
        conv3d(x, wt(w, "swinViT.patch_embed.proj.weight"), Some(&wt(w, "swinViT.patch_embed.proj.bias").data), 0, 2);
    let mut hs = vec![proj_out(&pe, cfg.normalize)];
    let mut feat = pe;
    for s in 0..4 {
        if cfg.use_v2 {
            feat = res_block(w, &format!("swinViT.layers{}c.0.layer", s + 1), &feat);
        }
        let mut cl = to_channels_last(&feat);
        for blk in 0..cfg.depths[s] {
            cl = swin_block(
                w,
                &format!("swinViT.layers{}.0.blocks.{blk}", s + 1),
                &cl,
                cfg.heads[s],
                cfg.window,
                blk % 2 == 1,
            );
        }
        feat =
            to_channels_first(&patch_merging(w, &format!("swinViT.layers{}.0.downsample", s + 1), &cl, cfg.merging_v2));
        hs.push(proj_out(&feat, cfg.normalize));
    }
    let enc0 = res_block(w, "encoder1.layer", x);
    let enc1 = res_block(w, "encoder2.layer", &hs[0]);
    let enc2 = res_block(w, "encoder3.layer", &hs[1]);
    let enc3 = res_block(w, "encoder4.layer", &hs[2]);
    let dec4 = res_block(w, "encoder10.layer", &hs[4]);
    let dec3 = up_block(w, "decoder5", &dec4, &hs[3]);
    let dec2 = up_block(w, "decoder4", &dec3, &enc3);
    let dec1 = up_block(w, "decoder3", &dec2, &enc2);
    let dec0 = up_block(w, "decoder2", &dec1, &enc1);
    let out = up_block(w, "decoder1", &dec0, &enc0);
    conv3d(&out, wt(w, "out.conv.conv.weight"), Some(&wt(w, "out.conv.conv.bias").data), 0, 1)
}

// ---------------------------------------------------------------------------------------------
// The teacher's ops: depthwise convolution, linear interpolation, max pooling.

/// Depthwise convolution (`groups = C`): each channel of `x [B,C,D,H,W]` with its own `w [C,1,k,k,k]`.
pub fn depthwise_conv3d(x: &Arr, w: &Arr, bias: Option<&[f64]>, pad: usize) -> Arr {
    let (b, c, d, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]);
    let (kd, kh, kw) = (w.shape[2], w.shape[3], w.shape[4]);
    let (od, oh, ow) = (d + 2 * pad + 1 - kd, h + 2 * pad + 1 - kh, wd + 2 * pad + 1 - kw);
    let mut y = Arr::zeros(&[b, c, od, oh, ow]);
    let at = |n: usize, o: usize, k: usize| (o + k).checked_sub(pad).filter(|&i| i < n);
    for bb in 0..b {
        for cc in 0..c {
            for i in 0..od {
                for j in 0..oh {
                    for l in 0..ow {
                        let mut acc = bias.map_or(0.0, |bs| bs[cc]);
                        for a in 0..kd {
                            for q in 0..kh {
                                for r in 0..kw {
                                    if let (Some(z), Some(yy), Some(xx)) = (at(d, i, a), at(h, j, q), at(wd, l, r)) {
                                        acc += x.at(&[bb, cc, z, yy, xx]) * w.at(&[cc, 0, a, q, r]);
                                    }
                                }
                            }
                        }
                        y.set(&[bb, cc, i, j, l], acc);
                    }
                }
            }
        }
    }
    y
}

/// PyTorch's source index and neighbours for linear interpolation along one axis.
fn lerp_source(n_in: usize, n_out: usize, o: usize, align_corners: bool) -> (usize, usize, f64) {
    let src = if align_corners {
        if n_out > 1 { o as f64 * (n_in - 1) as f64 / (n_out - 1) as f64 } else { 0.0 }
    } else {
        ((o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0)
    };
    let i0 = (src.floor() as usize).min(n_in - 1);
    (i0, (i0 + 1).min(n_in - 1), src - i0 as f64)
}

/// `F.interpolate(x, size, mode="trilinear", align_corners)` on `x [B,C,D,H,W]`, written as
/// PyTorch's kernel computes it: a weighted sum of the 8 neighbours.
pub fn trilinear(x: &Arr, size: [usize; 3], align_corners: bool) -> Arr {
    let (b, c) = (x.shape[0], x.shape[1]);
    let n = [x.shape[2], x.shape[3], x.shape[4]];
    let mut y = Arr::zeros(&[b, c, size[0], size[1], size[2]]);
    for bb in 0..b {
        for cc in 0..c {
            for i in 0..size[0] {
                let (d0, d1, fd) = lerp_source(n[0], size[0], i, align_corners);
                for j in 0..size[1] {
                    let (h0, h1, fh) = lerp_source(n[1], size[1], j, align_corners);
                    for l in 0..size[2] {
                        let (w0, w1, fw) = lerp_source(n[2], size[2], l, align_corners);
                        let mut acc = 0.0;
                        for (z, gz) in [(d0, 1.0 - fd), (d1, fd)] {
                            for (yy, gy) in [(h0, 1.0 - fh), (h1, fh)] {
                                for (xx, gx) in [(w0, 1.0 - fw), (w1, fw)] {
                                    acc += gz * gy * gx * x.at(&[bb, cc, z, yy, xx]);
                                }
                            }
                        }
                        y.set(&[bb, cc, i, j, l], acc);
                    }
                }
            }
        }
    }
    y
}

/// `nn.MaxPool3d(k)` (stride k) on `x [B,C,D,H,W]`.
pub fn max_pool3d(x: &Arr, k: usize) -> Arr {
    let (b, c, d, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3], x.shape[4]);
    let mut y = Arr::zeros(&[b, c, d / k, h / k, w / k]);
    for bb in 0..b {
        for cc in 0..c {
            for i in 0..d / k {
                for j in 0..h / k {
                    for l in 0..w / k {
                        let mut m = f64::NEG_INFINITY;
                        for a in 0..k {
                            for q in 0..k {
                                for r in 0..k {
                                    m = m.max(x.at(&[bb, cc, i * k + a, j * k + q, l * k + r]));
                                }
                            }
                        }
                        y.set(&[bb, cc, i, j, l], m);
                    }
                }
            }
        }
    }
    y
}
