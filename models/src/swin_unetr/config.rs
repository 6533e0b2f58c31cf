//! SwinUNETR configuration: MONAI's constructor options that change the weights or the numbers.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Patch merging layout between Swin stages. Both have the same parameters, so a checkpoint does
/// not tell which one it was trained with: it must be configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Downsample {
    /// MONAI's default (`downsample="merging"`, the v0.9.0 channel order).
    #[default]
    Merging,
    /// `downsample="mergingv2"`: sub-volumes concatenated in `itertools.product` order.
    MergingV2,
}

impl Downsample {
    /// The (d, h, w) offsets of the 8 strided sub-volumes, in concatenation order.
    pub fn offsets(self) -> [[usize; 3]; 8] {
        match self {
            Downsample::Merging => {
                [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
            }
            Downsample::MergingV2 => {
                [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [1, 0, 0], [1, 0, 1], [1, 1, 0], [1, 1, 1]]
            }
        }
    }
}

impl std::fmt::Display for Downsample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Downsample::Merging => "merging",
            Downsample::MergingV2 => "mergingv2",
        })
    }
}

impl std::str::FromStr for Downsample {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "merging" => Ok(Downsample::Merging),
            "mergingv2" => Ok(Downsample::MergingV2),
            other => Err(format!("unknown downsample `{other}` (expected merging or mergingv2)")),
        }
    }
}

/// `monai.networks.nets.SwinUNETR(...)` with `spatial_dims=3`, `patch_size=2`, `qkv_bias=True`,
/// `mlp_ratio=4`, `norm_name="instance"` and no dropout (the fixed parts of MONAI's signature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    pub in_channels: usize,
    pub out_channels: usize,
    /// F: channels of the first stage; a multiple of 12.
    pub feature_size: usize,
    /// Swin blocks per stage; odd blocks use shifted windows.
    pub depths: [usize; 4],
    /// Attention heads per stage; stage s has F * 2^s channels, which the heads must divide.
    pub num_heads: [usize; 4],
    /// Cubic window edge (MONAI's default 7); the shift is half of it, rounded down.
    pub window_size: usize,
    /// A residual convolution block before each Swin stage.
    pub use_v2: bool,
    pub downsample: Downsample,
    /// Layer-normalise (without affine) the skip features taken from the Swin encoder.
    pub normalize: bool,
}

/// Spatial down-sampling from the input to the bottleneck: the patch embedding and four merges.
pub const TOTAL_STRIDE: usize = 32;

/// The largest sizes a SwinUNETR configuration may declare, far above any published one (MONAI's
/// BTCV model: feature size 48, depths 2, window 7), so that a crafted model file cannot make
/// prosam build, or list the parameters of, a network that fills the memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub in_channels: usize,
    pub out_channels: usize,
    pub feature_size: usize,
    /// Swin blocks in one stage.
    pub depth: usize,
    pub window_size: usize,
}

pub const LIMITS: Limits =
    Limits { in_channels: 16, out_channels: 1024, feature_size: 384, depth: 32, window_size: 16 };

impl Config {
    /// The BTCV student at a given feature size: 1 CT channel in, 14 classes out, MONAI defaults.
    pub fn btcv(feature_size: usize) -> Self {
        Self {
            in_channels: 1,
            out_channels: 14,
            feature_size,
            depths: [2, 2, 2, 2],
            num_heads: [3, 6, 12, 24],
            window_size: 7,
            use_v2: false,
            downsample: Downsample::Merging,
            normalize: true,
        }
    }

    /// feature_size 12, the BTCV `tiny` student.
    pub fn tiny() -> Self {
        Self::btcv(12)
    }

    /// feature_size 24, the BTCV `small` student.
    pub fn small() -> Self {
        Self::btcv(24)
    }

    /// feature_size 48, the BTCV `base` model.
    pub fn base() -> Self {
        Self::btcv(48)
    }

    /// A named preset: `tiny`, `small` or `base`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::tiny()),
            "small" => Some(Self::small()),
            "base" => Some(Self::base()),
            _ => None,
        }
    }

    /// Channels of stage `s` (0-based): F * 2^s.
    pub fn stage_channels(&self, s: usize) -> usize {
        self.feature_size << s
    }

    /// Rejects what MONAI's constructor rejects, what prosam does not implement, and sizes past
    /// [`LIMITS`]: a model file's configuration is checked before anything is built from it.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::InvalidConfig(m));
        if self.in_channels == 0 || self.out_channels == 0 {
            return fail("in_channels and out_channels must be positive".into());
        }
        let sizes = [
            ("in_channels", self.in_channels, LIMITS.in_channels),
            ("out_channels", self.out_channels, LIMITS.out_channels),
            ("feature_size", self.feature_size, LIMITS.feature_size),
            ("window_size", self.window_size, LIMITS.window_size),
        ];
        if let Some((name, value, limit)) = sizes.iter().find(|(_, v, limit)| v > limit) {
            return fail(format!("{name} {value} is over prosam's limit of {limit}"));
        }
        if let Some(d) = self.depths.iter().find(|&&d| d > LIMITS.depth) {
            return fail(format!(
                "depths {:?}: {d} blocks in a stage is over prosam's limit of {}",
                self.depths, LIMITS.depth
            ));
        }
        if self.feature_size == 0 || !self.feature_size.is_multiple_of(12) {
            return fail(format!("feature_size {} is not a positive multiple of 12", self.feature_size));
        }
        if self.window_size < 2 {
            return fail(format!("window_size {} must be at least 2", self.window_size));
        }
        for s in 0..4 {
            let (c, h) = (self.stage_channels(s), self.num_heads[s]);
            if h == 0 || c % h != 0 {
                return fail(format!("stage {} has {c} channels, which {h} heads do not divide", s + 1));
            }
        }
        Ok(())
    }

    /// Checks an input shape `(B, C, D, H, W)` against what the network can compute: each spatial
    /// size a multiple of 32, and a bottleneck of more than one voxel (MONAI's instance norm
    /// fails on a single voxel; Candle's would silently return zeros).
    pub fn check_input(&self, shape: &[usize]) -> Result<()> {
        let fail = |reason: String| Err(Error::InvalidInput { shape: shape.to_vec(), reason });
        let &[b, c, d, h, w] = shape else {
            return fail("expected 5 dimensions (batch, channels, D, H, W)".into());
        };
        if b == 0 {
            return fail("the batch is empty".into());
        }
        if c != self.in_channels {
            return fail(format!("the model takes {} input channel(s), the input has {c}", self.in_channels));
        }
        if [d, h, w].iter().any(|&s| s == 0 || s % TOTAL_STRIDE != 0) {
            return fail(format!("each spatial size must be a positive multiple of {TOTAL_STRIDE}, got {d}x{h}x{w}"));
        }
        let bottleneck = (d / TOTAL_STRIDE) * (h / TOTAL_STRIDE) * (w / TOTAL_STRIDE);
        if bottleneck < 2 {
            return fail(format!(
                "{d}x{h}x{w} leaves a one-voxel bottleneck, where instance norm is undefined; use at least 64 along one axis"
            ));
        }
        Ok(())
    }

    /// Every learned parameter under MONAI's state_dict key, with its shape, in module order.
    /// (The `relative_position_index` buffers are deterministic and not listed.)
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let f = self.feature_size;
        let cin = self.in_channels;
        let mut p: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |k: String, s: &[usize]| p.push((k, s.to_vec()));
        add("swinViT.patch_embed.proj.weight".into(), &[f, cin, 2, 2, 2]);
        add("swinViT.patch_embed.proj.bias".into(), &[f]);
        let table = (2 * self.window_size - 1).pow(3);
        for s in 0..4 {
            let c = self.stage_channels(s);
            let l = format!("swinViT.layers{}", s + 1);
            for b in 0..self.depths[s] {
                let k = format!("{l}.0.blocks.{b}");
                add(format!("{k}.norm1.weight"), &[c]);
                add(format!("{k}.norm1.bias"), &[c]);
                add(format!("{k}.attn.relative_position_bias_table"), &[table, self.num_heads[s]]);
                add(format!("{k}.attn.qkv.weight"), &[3 * c, c]);
                add(format!("{k}.attn.qkv.bias"), &[3 * c]);
                add(format!("{k}.attn.proj.weight"), &[c, c]);
                add(format!("{k}.attn.proj.bias"), &[c]);
                add(format!("{k}.norm2.weight"), &[c]);
                add(format!("{k}.norm2.bias"), &[c]);
                add(format!("{k}.mlp.linear1.weight"), &[4 * c, c]);
                add(format!("{k}.mlp.linear1.bias"), &[4 * c]);
                add(format!("{k}.mlp.linear2.weight"), &[c, 4 * c]);
                add(format!("{k}.mlp.linear2.bias"), &[c]);
            }
            add(format!("{l}.0.downsample.reduction.weight"), &[2 * c, 8 * c]);
            add(format!("{l}.0.downsample.norm.weight"), &[8 * c]);
            add(format!("{l}.0.downsample.norm.bias"), &[8 * c]);
            if self.use_v2 {
                add(format!("{l}c.0.layer.conv1.conv.weight"), &[c, c, 3, 3, 3]);
                add(format!("{l}c.0.layer.conv2.conv.weight"), &[c, c, 3, 3, 3]);
            }
        }
        let res_block = |add: &mut dyn FnMut(String, &[usize]), k: &str, i: usize, o: usize| {
            add(format!("{k}.conv1.conv.weight"), &[o, i, 3, 3, 3]);
            add(format!("{k}.conv2.conv.weight"), &[o, o, 3, 3, 3]);
            if i != o {
                add(format!("{k}.conv3.conv.weight"), &[o, i, 1, 1, 1]);
            }
        };
        res_block(&mut add, "encoder1.layer", cin, f);
        res_block(&mut add, "encoder2.layer", f, f);
        res_block(&mut add, "encoder3.layer", 2 * f, 2 * f);
        res_block(&mut add, "encoder4.layer", 4 * f, 4 * f);
        res_block(&mut add, "encoder10.layer", 16 * f, 16 * f);
        for (name, i, o) in [
            ("decoder5", 16 * f, 8 * f),
            ("decoder4", 8 * f, 4 * f),
            ("decoder3", 4 * f, 2 * f),
            ("decoder2", 2 * f, f),
            ("decoder1", f, f),
        ] {
            add(format!("{name}.transp_conv.conv.weight"), &[i, o, 2, 2, 2]);
            res_block(&mut add, &format!("{name}.conv_block"), 2 * o, o);
        }
        add("out.conv.conv.weight".into(), &[self.out_channels, f, 1, 1, 1]);
        add("out.conv.conv.bias".into(), &[self.out_channels]);
        p
    }

    /// Number of learned parameters (MONAI's `sum(p.numel() for p in model.parameters())`).
    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Multiply-accumulates of one forward pass on a `dims` input (convolutions, linear layers and
    /// the two attention products), for throughput figures.
    pub fn macs(&self, dims: [usize; 3]) -> u64 {
        let f = self.feature_size as u64;
        let vox = |level: u32| dims.iter().map(|&d| (d as u64) >> level).product::<u64>();
        let cin = self.in_channels as u64;
        let conv3 = |i: u64, o: u64, level: u32| 27 * i * o * vox(level);
        let res = |i: u64, o: u64, level: u32| {
            conv3(i, o, level) + conv3(o, o, level) + if i != o { i * o * vox(level) } else { 0 }
        };
        let mut total = cin * f * 8 * vox(1);
        for s in 0..4u32 {
            let c = f << s;
            let tokens = vox(s + 1);
            let level_dims = dims.map(|d| d >> (s + 1));
            let (ws, _) = crate::ops::window::stage_window(level_dims, self.window_size, self.window_size / 2);
            let n = (ws[0] * ws[1] * ws[2]) as u64;
            let padded: u64 = crate::ops::window::padded_dims(level_dims, ws).iter().map(|&d| d as u64).product();
            let per_block = tokens * (3 * c * c + c * c + 8 * c * c) + padded * n * c * 2;
            total += per_block * self.depths[s as usize] as u64 + vox(s + 2) * 8 * c * 2 * c;
            if self.use_v2 {
                total += 2 * conv3(c, c, s + 1);
            }
        }
        total += res(cin, f, 0) + res(f, f, 1) + res(2 * f, 2 * f, 2) + res(4 * f, 4 * f, 3) + res(16 * f, 16 * f, 5);
        for (i, o, level) in [(16 * f, 8 * f, 4), (8 * f, 4 * f, 3), (4 * f, 2 * f, 2), (2 * f, f, 1), (f, f, 0)] {
            total += i * o * vox(level) + res(2 * o, o, level);
        }
        total + f * self.out_channels as u64 * vox(0)
    }
}
