//! `prosam convert`: a MONAI SwinUNETR checkpoint (a student) or an AutoProSAM reference
//! checkpoint (the teacher) into a prosam model file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use prosam_models::autoprosam::{self, ApgInput};
use prosam_models::format::import::{MonaiOptions, import_autoprosam, import_monai};
use prosam_models::format::{BTCV_LABELS, Intensity, Metadata};
use prosam_models::swin_unetr::Downsample;

#[derive(clap::Args)]
pub struct Args {
    /// MONAI checkpoint (.pt zip: a bare state_dict, or nested under state_dict/model).
    #[arg(long, value_name = "CKPT", required_unless_present = "autoprosam", conflicts_with = "autoprosam")]
    monai: Option<PathBuf>,
    /// AutoProSAM teacher checkpoint of the reference code: one dict with `encoder.`, `feature.`
    /// and `decoder.` keys, or its training script's `{encoder_dict, feature_dict, decoder_dict}`.
    #[arg(long, value_name = "CKPT")]
    autoprosam: Option<PathBuf>,
    /// The teacher's configuration (with --autoprosam).
    #[arg(long, value_parser = ["tiny", "vit_b"], requires = "autoprosam")]
    preset: Option<String>,
    /// The teacher's crop edge in voxels (default: the preset's, 32 for tiny and 128 for vit_b).
    #[arg(long, requires = "autoprosam")]
    crop: Option<usize>,
    /// Where the teacher's prompt generator sits: `stage1` (the released code, and so its
    /// checkpoints) or `stage4` (the paper's figure).
    #[arg(long, default_value = "stage1", value_parser = ["stage1", "stage4"], requires = "autoprosam")]
    apg_input: String,
    /// The prosam model file to write (.safetensors).
    #[arg(short, long, value_name = "MODEL")]
    output: PathBuf,
    /// Patch-merging layout the checkpoint was trained with (a checkpoint does not record it).
    #[arg(long, default_value = "merging", value_parser = ["merging", "mergingv2"])]
    downsample: String,
    /// The network was built with normalize=False (raw skip features).
    #[arg(long)]
    no_normalize: bool,
    /// Voxel spacing in mm the model was trained at, per axis [default: 1.5,1.5,2.0].
    #[arg(long, value_name = "X,Y,Z")]
    spacing: Option<String>,
    /// Intensity transform: `A_MIN,A_MAX` (window scaled to 0..1 and clipped), `A_MIN,A_MAX,B_MIN,B_MAX`,
    /// or `clip-zscore:LOWER,UPPER,MEAN,STD` [default: -175,250 for students (BTCV),
    /// clip-zscore:-991,362,50,141 for the teacher (the reference code's)].
    #[arg(long, allow_hyphen_values = true)]
    intensity: Option<String>,
    /// Label names: `btcv` (the 14 BTCV classes) or a JSON file (a list of names, background
    /// first, or an object mapping label numbers to names).
    #[arg(long, default_value = "btcv")]
    labels: String,
    /// Sliding-window size the model was trained with [default: 96,96,96 for students, the crop
    /// for the teacher].
    #[arg(long, value_name = "D,H,W")]
    roi: Option<String>,
    /// Orientation of the network's axes.
    #[arg(long, default_value = "RAS")]
    axis_codes: String,
    /// Model name recorded in the metadata (default: the checkpoint's file stem).
    #[arg(long)]
    name: Option<String>,
}

fn numbers(text: &str, what: &str) -> anyhow::Result<Vec<f64>> {
    text.split(',').map(|s| s.trim().parse::<f64>().with_context(|| format!("{what}: `{s}` is not a number"))).collect()
}

fn parse_intensity(text: &str) -> anyhow::Result<Intensity> {
    let intensity = if let Some(rest) = text.strip_prefix("clip-zscore:") {
        match numbers(rest, "--intensity")?.as_slice() {
            &[lower, upper, mean, std] => Intensity::ClipZScore { lower, upper, mean, std },
            _ => bail!("--intensity clip-zscore: takes LOWER,UPPER,MEAN,STD"),
        }
    } else {
        match *numbers(text, "--intensity")?.as_slice() {
            [a_min, a_max] => Intensity::ScaleWindow { a_min, a_max, b_min: 0.0, b_max: 1.0, clip: true },
            [a_min, a_max, b_min, b_max] => Intensity::ScaleWindow { a_min, a_max, b_min, b_max, clip: true },
            _ => bail!("--intensity takes A_MIN,A_MAX or A_MIN,A_MAX,B_MIN,B_MAX or clip-zscore:LOWER,UPPER,MEAN,STD"),
        }
    };
    intensity.validate().map_err(|e| anyhow::anyhow!("--intensity: {e}"))?;
    Ok(intensity)
}

fn parse_labels(spec: &str) -> anyhow::Result<Vec<String>> {
    if spec == "btcv" {
        return Ok(BTCV_LABELS.iter().map(|s| s.to_string()).collect());
    }
    let path = Path::new(spec);
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--labels {spec}: not `btcv` and not a readable file"))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .with_context(|| format!("{}: every label name must be a string", path.display()))
            })
            .collect(),
        serde_json::Value::Object(map) => {
            let mut pairs = map
                .into_iter()
                .map(|(k, v)| {
                    let index: usize =
                        k.parse().with_context(|| format!("{}: key `{k}` is not a label number", path.display()))?;
                    let name = v
                        .as_str()
                        .with_context(|| format!("{}: label {k} is not a string", path.display()))?
                        .to_string();
                    Ok((index, name))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            pairs.sort();
            for (expected, (index, _)) in pairs.iter().enumerate() {
                anyhow::ensure!(
                    *index == expected,
                    "{}: label numbers must run 0, 1, 2, ... without gaps (missing {expected})",
                    path.display()
                );
            }
            Ok(pairs.into_iter().map(|(_, n)| n).collect())
        }
        _ => bail!("{}: expected a list of names or an object of number -> name", path.display()),
    }
}

pub fn run(args: Args, quiet: bool) -> anyhow::Result<()> {
    let source = args.monai.as_ref().or(args.autoprosam.as_ref()).expect("clap requires one source").clone();
    super::check_output_path(&args.output, &[&source])?;
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    let (defaults, tensors) = if let Some(ckpt) = &args.autoprosam {
        let preset = args.preset.as_deref().unwrap_or("tiny");
        let mut config = autoprosam::Config::preset(preset).expect("clap checks the preset");
        if let Some(crop) = args.crop {
            config = config.with_crop(crop);
        }
        config.apg_input = args.apg_input.parse::<ApgInput>().map_err(anyhow::Error::msg)?;
        config.validate().map_err(|e| anyhow::anyhow!("--preset {preset} --crop {}: {e}", config.crop))?;
        let imported = import_autoprosam(ckpt, &config)?;
        (Metadata::teacher(&name, config), imported.tensors)
    } else {
        let downsample: Downsample = args.downsample.parse().map_err(anyhow::Error::msg)?;
        let options = MonaiOptions { downsample, normalize: !args.no_normalize };
        let imported = import_monai(&source, options)?;
        (Metadata::btcv(&name, imported.config), imported.tensors)
    };
    let spacing: [f64; 3] = match &args.spacing {
        Some(text) => numbers(text, "--spacing")?
            .try_into()
            .map_err(|_| anyhow::anyhow!("--spacing takes three numbers X,Y,Z"))?,
        None => defaults.spacing,
    };
    let roi_size: [usize; 3] = match &args.roi {
        Some(text) => text
            .split(',')
            .map(|s| s.trim().parse::<usize>().with_context(|| format!("--roi: `{s}` is not a size")))
            .collect::<anyhow::Result<Vec<_>>>()?
            .try_into()
            .map_err(|_| anyhow::anyhow!("--roi takes three sizes D,H,W"))?,
        None => defaults.roi_size,
    };
    let intensity = match &args.intensity {
        Some(text) => parse_intensity(text)?,
        None => defaults.intensity,
    };
    let labels = parse_labels(&args.labels)?;
    let out_channels = defaults.architecture.out_channels();
    anyhow::ensure!(
        labels.len() == out_channels,
        "{} label names given for a network with {out_channels} output channels (pass --labels FILE.json)",
        labels.len(),
    );
    let metadata = Metadata {
        labels,
        axis_codes: args.axis_codes,
        spacing,
        intensity,
        roi_size,
        source: source.file_name().map(|s| s.to_string_lossy().into_owned()),
        ..defaults
    };
    metadata.validate().map_err(|e| anyhow::anyhow!("invalid model description: {e}"))?;
    let written = prosam_models::format::save(&args.output, metadata, &tensors)?;
    if !quiet {
        let what = match &written.architecture {
            prosam_models::format::Architecture::SwinUnetr(c) => format!(
                "SwinUNETR feature_size {}, depths {:?}, heads {:?}, use_v2 {}, {}",
                c.feature_size, c.depths, c.num_heads, c.use_v2, c.downsample
            ),
            prosam_models::format::Architecture::AutoProSam(c) => format!(
                "AutoProSAM teacher {} dim, {} blocks, crop {}, APG on {:?}",
                c.embed_dim, c.depth, c.crop, c.apg_input
            ),
        };
        eprintln!(
            "{}: {what}, {} parameters, {}",
            args.output.display(),
            written.architecture.parameter_count(),
            written.checksum
        );
    }
    Ok(())
}
