//! The teacher's configuration: every size of the network follows from these fields
//! (`../shared/spec/teacher.md` section 1).

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which encoder feature the automatic prompt generator replaces at the decoder input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApgInput {
    /// The paper's figure: decoder inputs `[f1, f2, f3, APG(f4)]` (taps in block order).
    #[default]
    Stage4,
    /// The released code: `[f4, f3, f2, APG(f1)]`.
    Stage1,
}

impl std::str::FromStr for ApgInput {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "stage4" => Ok(Self::Stage4),
            "stage1" => Ok(Self::Stage1),
            other => Err(format!("unknown APG input `{other}` (expected stage4 or stage1)")),
        }
    }
}

/// AutoProSAM: SAM's ViT image encoder lifted to 3D with adapters, the APG (a 3D U-Net) and the
/// MLAM decoder. Field names follow the reference code's constructor arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Edge of the cubic input crop in voxels.
    pub crop: usize,
    /// Trilinear up-sampling of the crop before SAM's 2D patch embedding.
    pub upsample: usize,
    /// SAM's patch size, and the slice-embedding kernel along X (`num_slice`).
    pub patch: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_ratio: usize,
    /// SAM's `img_size`: its position grid is `sam_img_size / patch`, average-pooled to the token grid.
    pub sam_img_size: usize,
    /// SAM's 2D window: only sizes the relative-position tables (`2 * window - 1` rows).
    pub sam_window: usize,
    /// SAM's global-attention blocks: their tables have `2 * sam_img_size / patch - 1` rows.
    pub global_attn_indexes: Vec<usize>,
    /// Edge of the 3D attention window in tokens; even blocks shift by half of it.
    pub cubic_window: usize,
    /// The blocks (1-based) whose outputs feed the four necks.
    pub taps: [usize; 4],
    /// Channels of the necks, the APG's input and output, and the decoder's inputs.
    pub out_chans: usize,
    /// Hidden width of each block's adapter.
    pub adapter_dim: usize,
    /// Channels of the APG's first level; the levels have 1, 2, 4, 8 and 10 times this.
    pub apg_base: usize,
    /// Down-scale factor (2 or 1) of each of the APG's four levels.
    pub apg_scales: [usize; 4],
    /// Channels of the decoder's heads.
    pub decoder_channels: usize,
    pub n_out: usize,
    pub apg_input: ApgInput,
}

/// The channel multipliers of the APG's five levels (CBIM's U-Net).
pub const APG_WIDTHS: [usize; 5] = [1, 2, 4, 8, 10];

impl Config {
    /// The paper's teacher: SAM ViT-B, 128^3 crops, 14 BTCV classes.
    pub fn vit_b() -> Self {
        Self {
            crop: 128,
            upsample: 4,
            patch: 16,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_ratio: 4,
            sam_img_size: 1024,
            sam_window: 14,
            global_attn_indexes: vec![2, 5, 8, 11],
            cubic_window: 8,
            taps: [3, 6, 9, 12],
            out_chans: 256,
            adapter_dim: 384,
            apg_base: 16,
            apg_scales: [2, 2, 2, 2],
            decoder_channels: 128,
            n_out: 14,
            apg_input: ApgInput::Stage4,
        }
    }

    /// The configuration of `../shared/fixtures/autoprosam/`: 64 dim, 12 blocks, 2 heads, 32^3 crop.
    pub fn tiny() -> Self {
        Self {
            crop: 32,
            embed_dim: 64,
            num_heads: 2,
            sam_img_size: 256,
            sam_window: 7,
            cubic_window: 4,
            out_chans: 32,
            adapter_dim: 32,
            apg_base: 8,
            apg_scales: [2, 2, 1, 1],
            decoder_channels: 16,
            ..Self::vit_b()
        }
    }

    /// The smallest teacher the constraints allow: 16^3 crops, a 4^3 token grid in windows of 2,
    /// two blocks, every width a few channels, 3 classes. For tests and quick checks of the
    /// training path; it learns nothing useful.
    pub fn micro() -> Self {
        Self {
            crop: 16,
            embed_dim: 8,
            depth: 2,
            num_heads: 2,
            sam_img_size: 64,
            sam_window: 3,
            global_attn_indexes: vec![1],
            cubic_window: 2,
            taps: [1, 1, 2, 2],
            out_chans: 4,
            adapter_dim: 4,
            apg_base: 2,
            apg_scales: [2, 1, 1, 1],
            decoder_channels: 2,
            n_out: 3,
            ..Self::tiny()
        }
    }

    /// A named preset: `vit_b` or `tiny`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "vit_b" => Some(Self::vit_b()),
            "tiny" => Some(Self::tiny()),
            _ => None,
        }
    }

    /// The same network at another crop: the APG's levels halve while a level stays at least
    /// 2 voxels wide (an instance norm over one voxel is degenerate). The token grid must still
    /// divide the position grid and the window; [`Config::validate`] says when it does not.
    pub fn with_crop(mut self, crop: usize) -> Self {
        self.crop = crop;
        let mut size = self.token_grid();
        for scale in &mut self.apg_scales {
            *scale = if size >= 4 { 2 } else { 1 };
            size /= *scale;
        }
        self
    }

    /// T: tokens per axis, `crop * upsample / patch`.
    pub fn token_grid(&self) -> usize {
        self.crop * self.upsample / self.patch.max(1)
    }

    /// SAM's position grid edge, `sam_img_size / patch`.
    pub fn position_grid(&self) -> usize {
        self.sam_img_size / self.patch.max(1)
    }

    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads.max(1)
    }

    /// Rows of block `i`'s relative-position tables in a SAM checkpoint.
    pub fn rel_pos_rows(&self, block: usize) -> usize {
        if self.global_attn_indexes.contains(&block) { 2 * self.position_grid() - 1 } else { 2 * self.sam_window - 1 }
    }

    /// Even blocks attend in shifted windows (the opposite of Swin).
    pub fn shifted(&self, block: usize) -> bool {
        block.is_multiple_of(2)
    }

    /// Channels of the APG's five levels.
    pub fn apg_channels(&self) -> [usize; 5] {
        APG_WIDTHS.map(|m| m * self.apg_base)
    }

    /// Spatial edge of the APG's five levels.
    pub fn apg_sizes(&self) -> [usize; 5] {
        let mut sizes = [self.token_grid(); 5];
        for level in 0..4 {
            sizes[level + 1] = sizes[level] / self.apg_scales[level].max(1);
        }
        sizes
    }

    /// Every constraint the sizes must meet, named; the reference code is hard-wired to one size
    /// and would fail (or silently pad) elsewhere.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidTeacherConfig(why));
        let nonzero = [
            ("crop", self.crop),
            ("upsample", self.upsample),
            ("patch", self.patch),
            ("embed_dim", self.embed_dim),
            ("depth", self.depth),
            ("num_heads", self.num_heads),
            ("mlp_ratio", self.mlp_ratio),
            ("sam_window", self.sam_window),
            ("cubic_window", self.cubic_window),
            ("out_chans", self.out_chans),
            ("adapter_dim", self.adapter_dim),
            ("apg_base", self.apg_base),
            ("decoder_channels", self.decoder_channels),
            ("n_out", self.n_out),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return bad(format!("{name} must be positive"));
        }
        // Far above SAM ViT-H (embed 1280, depth 32, 16 heads): a crafted model file cannot make
        // prosam build a network that fills the memory.
        let limits = [
            ("crop", self.crop, 512),
            ("upsample", self.upsample, 16),
            ("patch", self.patch, 64),
            ("embed_dim", self.embed_dim, 2048),
            ("depth", self.depth, 64),
            ("num_heads", self.num_heads, 64),
            ("mlp_ratio", self.mlp_ratio, 16),
            ("sam_window", self.sam_window, 64),
            ("cubic_window", self.cubic_window, 32),
            ("out_chans", self.out_chans, 1024),
            ("adapter_dim", self.adapter_dim, 2048),
            ("apg_base", self.apg_base, 1024),
            ("decoder_channels", self.decoder_channels, 1024),
            ("n_out", self.n_out, 1024),
            ("sam_img_size", self.sam_img_size, 4096),
        ];
        if let Some((name, value, limit)) = limits.iter().find(|(_, v, limit)| v > limit) {
            return bad(format!("{name} {value} is over prosam's limit of {limit}"));
        }
        if !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!("{} heads do not divide embed_dim {}", self.num_heads, self.embed_dim));
        }
        if !(self.crop * self.upsample).is_multiple_of(self.patch) {
            return bad(format!(
                "crop {} x upsample {} is not a multiple of the patch {}",
                self.crop, self.upsample, self.patch
            ));
        }
        let t = self.token_grid();
        // The decoder up-samples the token grid twice by 2: it must come back to the crop.
        if 4 * t != self.crop {
            return bad(format!(
                "the decoder returns 4 x the token grid ({}) but the crop is {}: patch must be 4 x upsample",
                4 * t,
                self.crop
            ));
        }
        if !t.is_multiple_of(self.cubic_window) {
            return bad(format!("the token grid {t} is not a multiple of the cubic window {}", self.cubic_window));
        }
        let p = self.position_grid();
        if !self.sam_img_size.is_multiple_of(self.patch) || p == 0 || !p.is_multiple_of(t) {
            return bad(format!(
                "SAM's position grid {p} (img_size {} / patch {}) is not a multiple of the token grid {t} (crop {})",
                self.sam_img_size, self.patch, self.crop
            ));
        }
        if let Some(&b) = self.taps.iter().find(|&&b| b == 0 || b > self.depth) {
            return bad(format!("tap after block {b} outside blocks 1..={}", self.depth));
        }
        if self.taps.windows(2).any(|w| w[0] > w[1]) {
            return bad(format!("taps {:?} are not in block order", self.taps));
        }
        if let Some(&s) = self.apg_scales.iter().find(|&&s| s != 1 && s != 2) {
            return bad(format!("APG scale {s} (each level scales by 2 or 1)"));
        }
        let sizes = self.apg_sizes();
        for level in 0..4 {
            if !sizes[level].is_multiple_of(self.apg_scales[level]) {
                return bad(format!("APG level {} of {} voxels does not halve", level + 1, sizes[level]));
            }
        }
        if sizes[4] < 2 {
            return bad(format!("the APG's deepest level is {} voxel(s) wide (at least 2 are needed)", sizes[4]));
        }
        Ok(())
    }

    /// Whether the teacher takes an input of `shape`: `(B, 1, crop, crop, crop)`, the windows
    /// of a batch run one by one.
    pub fn check_input(&self, shape: &[usize]) -> Result<()> {
        let c = self.crop;
        match *shape {
            [b, 1, d, h, w] if b > 0 && [d, h, w] == [c; 3] => Ok(()),
            _ => Err(Error::InvalidInput {
                shape: shape.to_vec(),
                reason: format!("the teacher takes 1-channel crops of {c}^3 voxels, (B, 1, {c}, {c}, {c})"),
            }),
        }
    }

    /// Every parameter with its shape, in the reference code's state_dict names (`encoder.`,
    /// `feature.` and `decoder.` prefixes, as the reference checkpoints store them).
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.embed_dim;
        let (hd, a, o) = (self.head_dim(), self.adapter_dim, self.out_chans);
        let mut shapes: Vec<(String, Vec<usize>)> = Vec::new();
        let mut add = |name: String, shape: Vec<usize>| shapes.push((name, shape));
        let p = self.position_grid();
        add("encoder.pos_embed".into(), vec![1, p, p, c]);
        add("encoder.depth_embed".into(), vec![1, self.token_grid(), c]);
        add("encoder.patch_embed.proj.weight".into(), vec![c, 3, self.patch, self.patch]);
        add("encoder.patch_embed.proj.bias".into(), vec![c]);
        add("encoder.slice_embed.weight".into(), vec![c, 1, 1, 1, self.patch]);
        add("encoder.slice_embed.bias".into(), vec![c]);
        for i in 0..self.depth {
            let blk = format!("encoder.blocks.{i}");
            let rows = self.rel_pos_rows(i);
            for norm in ["norm1", "norm2"] {
                add(format!("{blk}.{norm}.weight"), vec![c]);
                add(format!("{blk}.{norm}.bias"), vec![c]);
            }
            for table in ["rel_pos_h", "rel_pos_w", "rel_pos_d"] {
                add(format!("{blk}.attn.{table}"), vec![rows, hd]);
            }
            add(format!("{blk}.attn.lr"), vec![]);
            add(format!("{blk}.attn.qkv.weight"), vec![3 * c, c]);
            add(format!("{blk}.attn.qkv.bias"), vec![3 * c]);
            add(format!("{blk}.attn.proj.weight"), vec![c, c]);
            add(format!("{blk}.attn.proj.bias"), vec![c]);
            add(format!("{blk}.mlp.lin1.weight"), vec![self.mlp_ratio * c, c]);
            add(format!("{blk}.mlp.lin1.bias"), vec![self.mlp_ratio * c]);
            add(format!("{blk}.mlp.lin2.weight"), vec![c, self.mlp_ratio * c]);
            add(format!("{blk}.mlp.lin2.bias"), vec![c]);
            add(format!("{blk}.adapter.linear1.weight"), vec![a, c]);
            add(format!("{blk}.adapter.linear1.bias"), vec![a]);
            add(format!("{blk}.adapter.conv.weight"), vec![a, 1, 3, 3, 3]);
            add(format!("{blk}.adapter.conv.bias"), vec![a]);
            add(format!("{blk}.adapter.linear2.weight"), vec![c, a]);
            add(format!("{blk}.adapter.linear2.bias"), vec![c]);
        }
        for k in 0..4 {
            let neck = format!("encoder.neck_3d.{k}");
            add(format!("{neck}.0.weight"), vec![o, c, 1, 1, 1]);
            add(format!("{neck}.1.weight"), vec![o]);
            add(format!("{neck}.1.bias"), vec![o]);
            add(format!("{neck}.2.weight"), vec![o, o, 3, 3, 3]);
            add(format!("{neck}.3.weight"), vec![o]);
            add(format!("{neck}.3.bias"), vec![o]);
        }
        let ch = self.apg_channels();
        add("feature.inc.conv1.weight".into(), vec![ch[0], o, 3, 3, 3]);
        add("feature.inc.conv2.conv.conv.weight".into(), vec![ch[0], ch[0], 3, 3, 3]);
        for level in 1..5 {
            let (i, j) = (ch[level - 1], ch[level]);
            add(format!("feature.down{level}.conv.1.conv.conv.weight"), vec![j, i, 3, 3, 3]);
            add(format!("feature.down{level}.conv.2.conv.conv.weight"), vec![j, j, 3, 3, 3]);
        }
        for up in 1..5 {
            let (skip, below) = (ch[4 - up], ch[5 - up]);
            add(format!("feature.up{up}.conv.0.conv.conv.weight"), vec![skip, skip + below, 3, 3, 3]);
            add(format!("feature.up{up}.conv.1.conv.conv.weight"), vec![skip, skip, 3, 3, 3]);
        }
        add("feature.outc.weight".into(), vec![o, ch[0], 1, 1, 1]);
        add("feature.outc.bias".into(), vec![o]);
        let h = self.decoder_channels;
        for head in 2..6 {
            add(format!("decoder.mlahead.head{head}.0.weight"), vec![h, o, 3, 3, 3]);
            add(format!("decoder.mlahead.head{head}.3.weight"), vec![h, h, 3, 3, 3]);
        }
        add("decoder.cls.0.weight".into(), vec![h, 4 * h + 1, 3, 3, 3]);
        add("decoder.cls.3.weight".into(), vec![self.n_out, h, 3, 3, 3]);
        shapes
    }

    /// Multiply-accumulates of one crop's forward pass, counting the convolutions, linear layers
    /// and attention products (the patch embedding with its three channels summed, as prosam
    /// computes it).
    pub fn macs(&self) -> u64 {
        let u = |v: usize| v as u64;
        let (c, t, p) = (u(self.embed_dim), u(self.token_grid()), u(self.patch));
        let n_tokens = t.pow(3);
        let slices = u(self.upsample * self.crop);
        let window = u(self.cubic_window).pow(3);
        let (a, o, hd) = (u(self.adapter_dim), u(self.out_chans), u(self.head_dim()));
        let embed = slices * t * t * p * p * c + n_tokens * c * p;
        let attention = 2 * n_tokens * window * c + n_tokens * u(self.num_heads) * 3 * u(self.cubic_window) * hd;
        let block = n_tokens * (3 * c * c + c * c + 2 * u(self.mlp_ratio) * c * c + 2 * c * a + 27 * a) + attention;
        let necks = 4 * n_tokens * (c * o + 27 * o * o);
        let conv3 = |cin: usize, cout: usize, size: usize| 27 * u(cin) * u(cout) * u(size).pow(3);
        let (ch, sizes) = (self.apg_channels(), self.apg_sizes());
        let mut apg = conv3(self.out_chans, ch[0], sizes[0]) + conv3(ch[0], ch[0], sizes[0]) + o * u(ch[0]) * n_tokens;
        for l in 1..5 {
            apg += conv3(ch[l - 1], ch[l], sizes[l]) + conv3(ch[l], ch[l], sizes[l]);
            apg += conv3(ch[l - 1] + ch[l], ch[l - 1], sizes[l - 1]) + conv3(ch[l - 1], ch[l - 1], sizes[l - 1]);
        }
        let (h, t2) = (self.decoder_channels, 2 * self.token_grid());
        let decoder = 4 * (conv3(self.out_chans, h, t as usize) + conv3(h, h, t as usize))
            + conv3(4 * h + 1, h, t2)
            + conv3(h, self.n_out, t2);
        embed + u(self.depth) * block + necks + apg + decoder
    }

    /// Parameters that train in `stage` ([`Config::trains_in_stage`]).
    pub fn trainable_count(&self, stage: u8) -> usize {
        let shapes = self.parameter_shapes();
        shapes.iter().filter(|(n, _)| Self::trains_in_stage(n, stage)).map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Whether a parameter comes from SAM's image encoder (`init_network` loads it from the SAM
    /// checkpoint): the patch and position embeddings and, per block, the norms, attention,
    /// relative-position tables and MLP.
    pub fn loads_from_sam(name: &str) -> bool {
        let Some(rest) = name.strip_prefix("encoder.") else { return false };
        if rest.starts_with("patch_embed.") || rest == "pos_embed" {
            return true;
        }
        let Some((_, after)) = rest.strip_prefix("blocks.").and_then(|r| r.split_once('.')) else { return false };
        matches!(after, "attn.rel_pos_h" | "attn.rel_pos_w")
            || ["norm1.", "norm2.", "attn.qkv.", "attn.proj.", "mlp."].iter().any(|p| after.starts_with(p))
    }

    /// SAM's frozen backbone: what comes from SAM except the norms (which train), plus the
    /// rel-pos scale `lr` (new, but frozen in the reference).
    pub fn is_sam_backbone(name: &str) -> bool {
        let norm = name.contains(".norm1.") || name.contains(".norm2.");
        (Self::loads_from_sam(name) && !norm) || name.ends_with(".attn.lr")
    }

    /// Whether `name` trains in `stage` (spec section 8 (c)): stage 1 trains everything but SAM's
    /// backbone; stage 2 only the APG and the decoder.
    pub fn trains_in_stage(name: &str, stage: u8) -> bool {
        match stage {
            1 => !Self::is_sam_backbone(name),
            _ => name.starts_with("feature.") || name.starts_with("decoder."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_count_like_the_reference() {
        let tiny = Config::tiny();
        tiny.validate().unwrap();
        assert_eq!(tiny.token_grid(), 8);
        // The fixture's README: encoder 869,260, APG 1,042,272, decoder 117,072.
        assert_eq!(tiny.parameter_count(), 869_260 + 1_042_272 + 117_072);
        let vit_b = Config::vit_b();
        vit_b.validate().unwrap();
        assert_eq!(vit_b.apg_sizes(), [32, 16, 8, 4, 2]);
        // The spec's table for n_out 14.
        assert_eq!(vit_b.parameter_count(), 115_441_548);
        assert_eq!(vit_b.trainable_count(1), 26_594_944);
        assert_eq!(vit_b.trainable_count(2), 11_384_960);
        // The spec's count is 4,560 GMAC with SAM's three input channels (309 GMAC of patch
        // embedding, 103 with them summed).
        let gmac = vit_b.macs() as f64 / 1e9;
        assert!((gmac - (4560.0 - 206.0)).abs() < 0.01 * 4354.0, "{gmac} GMAC");
        assert_eq!(tiny.trainable_count(1), 1_351_664, "the fixture's keys.txt");
    }

    #[test]
    fn other_crops_adapt_the_apg_or_say_why_not() {
        let at64 = Config::tiny().with_crop(64);
        at64.validate().unwrap();
        assert_eq!(at64.apg_sizes(), [16, 8, 4, 2, 2]);
        assert_eq!(Config::tiny().with_crop(32), Config::tiny());
        let err = Config::tiny().with_crop(128).validate().unwrap_err().to_string();
        assert!(err.contains("position grid 16"), "{err}");
        Config::micro().validate().unwrap();
        let err = Config::tiny().with_crop(24).validate().unwrap_err().to_string();
        assert!(err.contains("cubic window"), "{err}");
    }
}
