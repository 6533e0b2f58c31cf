//! The JSON metadata of a prosam model file.

use serde::{Deserialize, Serialize};

use crate::autoprosam;
use crate::swin_unetr::Config;

/// The network and its configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", content = "config")]
pub enum Architecture {
    /// A student.
    #[serde(rename = "swin_unetr")]
    SwinUnetr(Config),
    /// The teacher.
    #[serde(rename = "autoprosam")]
    AutoProSam(autoprosam::Config),
}

impl Architecture {
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::SwinUnetr(_) => "swin_unetr",
            Architecture::AutoProSam(_) => "autoprosam",
        }
    }

    pub fn in_channels(&self) -> usize {
        match self {
            Architecture::SwinUnetr(c) => c.in_channels,
            Architecture::AutoProSam(_) => 1,
        }
    }

    pub fn out_channels(&self) -> usize {
        match self {
            Architecture::SwinUnetr(c) => c.out_channels,
            Architecture::AutoProSam(c) => c.n_out,
        }
    }

    pub fn parameter_count(&self) -> usize {
        match self {
            Architecture::SwinUnetr(c) => c.parameter_count(),
            Architecture::AutoProSam(c) => c.parameter_count(),
        }
    }

    /// Every stored parameter with its shape.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Architecture::SwinUnetr(c) => c.parameter_shapes(),
            Architecture::AutoProSam(c) => c.parameter_shapes(),
        }
    }

    pub fn validate(&self) -> crate::Result<()> {
        match self {
            Architecture::SwinUnetr(c) => c.validate(),
            Architecture::AutoProSam(c) => c.validate(),
        }
    }

    /// Whether the network takes an input of `shape` `(B, C, D, H, W)`, and why not.
    pub fn check_input(&self, shape: &[usize]) -> crate::Result<()> {
        match self {
            Architecture::SwinUnetr(c) => c.check_input(shape),
            Architecture::AutoProSam(c) => c.check_input(shape),
        }
    }
}

/// How CT values in HU become network input.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Intensity {
    /// MONAI `ScaleIntensityRanged(a_min, a_max, b_min, b_max, clip)`: the window [a_min, a_max]
    /// mapped linearly onto [b_min, b_max], clipped when `clip` (the BTCV students: -175..250 to 0..1).
    ScaleWindow { a_min: f64, a_max: f64, b_min: f64, b_max: f64, clip: bool },
    /// Clip to [lower, upper], then (x - mean) / std (the teacher's transform).
    ClipZScore { lower: f64, upper: f64, mean: f64, std: f64 },
}

impl Intensity {
    /// The BTCV window, -175..250 HU onto 0..1, clipped.
    pub fn btcv() -> Self {
        Intensity::ScaleWindow { a_min: -175.0, a_max: 250.0, b_min: 0.0, b_max: 1.0, clip: true }
    }

    /// The transform of one HU value, in float32 as MONAI applies it (and the runtime does).
    pub fn map_f32(&self) -> impl Fn(f32) -> f32 + Sync + Send + Copy {
        /// The transform's constants, converted to f32 once.
        #[derive(Clone, Copy)]
        enum F32 {
            Window { a0: f32, span: f32, b0: f32, b_span: f32, lo: f32, hi: f32, clip: bool },
            ZScore { lo: f32, hi: f32, mean: f32, std: f32 },
        }
        let constants = match *self {
            Intensity::ScaleWindow { a_min, a_max, b_min, b_max, clip } => F32::Window {
                a0: a_min as f32,
                span: (a_max - a_min) as f32,
                b0: b_min as f32,
                b_span: (b_max - b_min) as f32,
                lo: b_min.min(b_max) as f32,
                hi: b_min.max(b_max) as f32,
                clip,
            },
            Intensity::ClipZScore { lower, upper, mean, std } => {
                F32::ZScore { lo: lower as f32, hi: upper as f32, mean: mean as f32, std: std as f32 }
            }
        };
        move |x: f32| match constants {
            // ScaleIntensityRange: (x - a_min) / (a_max - a_min), then * (b_max - b_min) + b_min, then clip.
            F32::Window { a0, span, b0, b_span, lo, hi, clip } => {
                let y = (x - a0) / span * b_span + b0;
                if clip { y.clamp(lo, hi) } else { y }
            }
            F32::ZScore { lo, hi, mean, std } => (x.clamp(lo, hi) - mean) / std,
        }
    }

    /// Refuses parameters that are not finite, an empty window, and parameters whose float32
    /// arithmetic overflows on CT values (-32768..65535 HU, every integer CT type's range): each
    /// would silently turn a whole CT into NaN or infinity.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Intensity::ScaleWindow { a_min, a_max, b_min, b_max, .. } => {
                if ![a_min, a_max, b_min, b_max].iter().all(|v| v.is_finite()) || a_max <= a_min {
                    return Err(format!("intensity window {a_min}..{a_max} is empty or not finite"));
                }
            }
            Intensity::ClipZScore { lower, upper, mean, std } => {
                if ![lower, upper, mean, std].iter().all(|v| v.is_finite()) || upper <= lower || std <= 0.0 {
                    return Err(format!("clip {lower}..{upper} with std {std} is invalid"));
                }
            }
        }
        let map = self.map_f32();
        for hu in [-32768.0f32, -1024.0, 0.0, 3071.0, 65535.0] {
            let y = map(hu);
            if !y.is_finite() {
                return Err(format!("intensity transform ({self}) maps {hu} HU to {y} in float32"));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Intensity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Intensity::ScaleWindow { a_min, a_max, b_min, b_max, clip } => {
                write!(f, "window {a_min}..{a_max} HU -> {b_min}..{b_max}{}", if clip { ", clipped" } else { "" })
            }
            Intensity::ClipZScore { lower, upper, mean, std } => {
                write!(f, "clip {lower}..{upper} HU, then (x - {mean}) / {std}")
            }
        }
    }
}

/// How the weights are stored and computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    /// Every tensor in half precision.
    F16,
    /// Linear layers and 3x3x3 convolutions as Q8_0 int8 blocks, everything else in f16.
    Int8,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            "int8" => Ok(Precision::Int8),
            other => Err(format!("unknown precision `{other}` (expected f32, f16 or int8)")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Int8 => "int8",
        })
    }
}

/// Everything the runtime needs besides the weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub format_version: u32,
    /// A short human name, e.g. the source checkpoint's file stem.
    pub name: String,
    pub architecture: Architecture,
    /// One name per output channel, background first.
    pub labels: Vec<String>,
    /// Orientation the network expects its axes in (`RAS`: axis 0 towards the patient's right...
    /// as nibabel codes it).
    pub axis_codes: String,
    /// Voxel spacing in mm the network was trained at, per axis.
    pub spacing: [f64; 3],
    pub intensity: Intensity,
    /// Sliding-window size the network was trained with.
    pub roi_size: [usize; 3],
    pub precision: Precision,
    /// `sha256:<hex>` of the weights (see `format::save`), verified at load.
    pub checksum: String,
    /// Where the weights came from (the source checkpoint's file name), for provenance.
    #[serde(default)]
    pub source: Option<String>,
    /// The prosam version that wrote the file.
    #[serde(default)]
    pub writer: Option<String>,
    /// What the weights were trained on (for `prosam-distill`: the data set's name and
    /// description from its dataset.json), so that the provenance travels with the file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_data: Option<String>,
    /// The terms the weights may be used under, inherited from their training data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub licence: Option<String>,
    /// What the model is for, and what not (e.g. not for clinical decisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intended_use: Option<String>,
    /// Weights stored in a quantized encoding, by their key (the stored tensor is `KEY.q8_0`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub quantized: std::collections::BTreeMap<String, QuantizedTensor>,
}

/// How a quantized weight is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuantizedTensor {
    /// `q8_0`: Candle/GGML Q8_0 blocks of the weight flattened to (rows, cols), cols zero-padded to
    /// a multiple of 32.
    pub encoding: String,
    /// The weight's shape as the network uses it.
    pub shape: Vec<usize>,
}

/// The 14 BTCV classes, in the label order of the BTCV challenge and MONAI's BTCV models.
pub const BTCV_LABELS: [&str; 14] = [
    "background",
    "spleen",
    "right_kidney",
    "left_kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior_vena_cava",
    "portal_and_splenic_vein",
    "pancreas",
    "right_adrenal_gland",
    "left_adrenal_gland",
];

impl Metadata {
    /// Metadata for a SwinUNETR student with the BTCV defaults: the 14 BTCV labels (when the
    /// network has 14 outputs; `label_N` otherwise), RAS axes, 1.5 x 1.5 x 2.0 mm, the -175..250 HU
    /// window, a 96^3 ROI, f32. The checksum is filled in by `format::save`.
    pub fn btcv(name: &str, config: Config) -> Self {
        let labels = if config.out_channels == BTCV_LABELS.len() {
            BTCV_LABELS.iter().map(|s| s.to_string()).collect()
        } else {
            (0..config.out_channels).map(|i| format!("label_{i}")).collect()
        };
        Metadata {
            format_version: super::FORMAT_VERSION,
            name: name.to_string(),
            architecture: Architecture::SwinUnetr(config),
            labels,
            axis_codes: "RAS".into(),
            spacing: [1.5, 1.5, 2.0],
            intensity: Intensity::btcv(),
            roi_size: [96, 96, 96],
            precision: Precision::F32,
            checksum: String::new(),
            source: None,
            writer: Some(format!("prosam {}", env!("CARGO_PKG_VERSION"))),
            training_data: None,
            licence: None,
            intended_use: None,
            quantized: Default::default(),
        }
    }

    /// Metadata for the AutoProSAM teacher: the BTCV labels (for 14 outputs), RAS axes, the
    /// students' 1.5 x 1.5 x 2.0 mm spacing (so that distillation shares crops), the reference
    /// code's intensity transform (clip to -991..362 HU, then (x - 50) / 141), its crop as the ROI.
    pub fn teacher(name: &str, config: autoprosam::Config) -> Self {
        let crop = config.crop;
        let labels = if config.n_out == BTCV_LABELS.len() {
            BTCV_LABELS.iter().map(|s| s.to_string()).collect()
        } else {
            (0..config.n_out).map(|i| format!("label_{i}")).collect()
        };
        Metadata {
            labels,
            intensity: Intensity::ClipZScore { lower: -991.0, upper: 362.0, mean: 50.0, std: 141.0 },
            roi_size: [crop; 3],
            architecture: Architecture::AutoProSam(config),
            ..Metadata::btcv(name, Config::tiny())
        }
    }

    /// Checks the fields against each other and against the architecture, and every size
    /// against prosam's limits, before anything is built from them.
    pub fn validate(&self) -> Result<(), String> {
        let arch = &self.architecture;
        arch.validate().map_err(|e| e.to_string())?;
        if self.labels.len() != arch.out_channels() {
            return Err(format!("{} label names for {} output channels", self.labels.len(), arch.out_channels()));
        }
        check_labels(&self.labels)?;
        for (field, text) in [
            ("source", &self.source),
            ("writer", &self.writer),
            ("training_data", &self.training_data),
            ("licence", &self.licence),
            ("intended_use", &self.intended_use),
        ] {
            check_note(field, text.as_deref())?;
        }
        if self.spacing.iter().any(|s| !(s.is_finite() && *s >= MIN_SPACING_MM && *s <= MAX_SPACING_MM)) {
            return Err(format!("spacing {:?} must lie in {MIN_SPACING_MM}..{MAX_SPACING_MM} mm", self.spacing));
        }
        if self.roi_size.iter().any(|&r| r > MAX_ROI) {
            return Err(format!("roi_size {:?} is over prosam's limit of {MAX_ROI} voxels an axis", self.roi_size));
        }
        if parse_axis_codes(&self.axis_codes).is_none() {
            return Err(format!("axis codes `{}` are not three of L/R, P/A, I/S on distinct axes", self.axis_codes));
        }
        if (self.precision == Precision::Int8) == self.quantized.is_empty() {
            return Err(format!("precision {} but {} quantized tensors listed", self.precision, self.quantized.len()));
        }
        if self.precision == Precision::Int8 && matches!(arch, Architecture::AutoProSam(_)) {
            return Err("the teacher runs in f32 or f16, not int8".into());
        }
        let mut roi_shape = vec![1, arch.in_channels()];
        roi_shape.extend(self.roi_size);
        arch.check_input(&roi_shape).map_err(|e| format!("roi_size {:?}: {e}", self.roi_size))?;
        self.intensity.validate()
    }
}

/// The most classes a model may have: label maps are uint8.
pub const MAX_CLASSES: usize = 256;

/// The longest label name, in bytes: names become file names (`liver.nii.gz`).
pub const MAX_LABEL_BYTES: usize = 128;

/// The largest sliding window, per axis.
pub const MAX_ROI: usize = 512;

/// The model spacing's bounds, in mm.
pub const MIN_SPACING_MM: f64 = 0.05;
pub const MAX_SPACING_MM: f64 = 50.0;

/// Label names that fit a uint8 map and can be file names, log lines and JSON keys as they are:
/// at most [`MAX_CLASSES`], each non-empty, unique, without control characters or path
/// separators, not `.` or `..`, at most [`MAX_LABEL_BYTES`].
/// The longest free-text field (provenance, licence, intended use) a model file may carry.
pub const MAX_NOTE_BYTES: usize = 4096;

/// Free text is printed by `prosam info`: bounded, and no control characters that could drive a
/// terminal.
fn check_note(field: &str, text: Option<&str>) -> Result<(), String> {
    let Some(text) = text else { return Ok(()) };
    if text.len() > MAX_NOTE_BYTES {
        return Err(format!("{field} is {} bytes, over the limit of {MAX_NOTE_BYTES}", text.len()));
    }
    if text.chars().any(char::is_control) {
        return Err(format!("{field} holds a control character"));
    }
    Ok(())
}

fn check_labels(labels: &[String]) -> Result<(), String> {
    if labels.len() > MAX_CLASSES {
        return Err(format!(
            "{} classes, but label maps are uint8 and hold at most {MAX_CLASSES} (labels 0..255)",
            labels.len()
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, name) in labels.iter().enumerate() {
        let problem = if name.is_empty() {
            Some("is empty".to_string())
        } else if name.len() > MAX_LABEL_BYTES {
            Some(format!("is longer than {MAX_LABEL_BYTES} bytes"))
        } else if name.chars().any(char::is_control) {
            Some("holds a control character".to_string())
        } else if name.contains(['/', '\\']) || name == "." || name == ".." {
            Some("is not usable as a file name (a path separator, `.` or `..`)".to_string())
        } else if !seen.insert(name.as_str()) {
            Some("appears twice".to_string())
        } else {
            None
        };
        if let Some(problem) = problem {
            return Err(format!("label {i} {name:?} {problem}"));
        }
    }
    Ok(())
}

/// Axis codes as nibabel and MONAI write them (`RAS`, `LPS`, ...), letter by letter: for each
/// array axis, the anatomical axis it runs along (0 left-right, 1 posterior-anterior, 2
/// inferior-superior) and whether it runs toward L, P or I. `None` unless three letters name three
/// distinct anatomical axes.
pub fn parse_axis_codes(codes: &str) -> Option<[(usize, bool); 3]> {
    let letters: Vec<char> = codes.chars().collect();
    let &[a, b, c] = letters.as_slice() else { return None };
    let mut seen = [false; 3];
    let mut axes = [(0, false); 3];
    for (k, letter) in [a, b, c].into_iter().enumerate() {
        let axis = match letter.to_ascii_uppercase() {
            'R' => (0, false),
            'L' => (0, true),
            'A' => (1, false),
            'P' => (1, true),
            'S' => (2, false),
            'I' => (2, true),
            _ => return None,
        };
        if std::mem::replace(&mut seen[axis.0], true) {
            return None;
        }
        axes[k] = axis;
    }
    Some(axes)
}
