//! `prosam convert`: a MONAI SwinUNETR checkpoint into a prosam model file.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use prosam_models::format::import::{MonaiOptions, import_monai};
use prosam_models::format::{BTCV_LABELS, Intensity, Metadata};
use prosam_models::swin_unetr::Downsample;

#[derive(clap::Args)]
pub struct Args {
    /// MONAI checkpoint (.pt zip: a bare state_dict, or nested under state_dict/model).
    #[arg(long, value_name = "CKPT")]
    monai: PathBuf,
    /// The prosam model file to write (.safetensors).
    #[arg(short, long, value_name = "MODEL")]
    output: PathBuf,
    /// Patch-merging layout the checkpoint was trained with (a checkpoint does not record it).
    #[arg(long, default_value = "merging", value_parser = ["merging", "mergingv2"])]
    downsample: String,
    /// The network was built with normalize=False (raw skip features).
    #[arg(long)]
    no_normalize: bool,
    /// Voxel spacing in mm the model was trained at, per axis.
    #[arg(long, default_value = "1.5,1.5,2.0", value_name = "X,Y,Z")]
    spacing: String,
    /// Intensity transform: `A_MIN,A_MAX` (window scaled to 0..1 and clipped, as the BTCV
    /// students), `A_MIN,A_MAX,B_MIN,B_MAX`, or `clip-zscore:LOWER,UPPER,MEAN,STD`.
    #[arg(long, default_value = "-175,250", allow_hyphen_values = true)]
    intensity: String,
    /// Label names: `btcv` (the 14 BTCV classes) or a JSON file (a list of names, background
    /// first, or an object mapping label numbers to names).
    #[arg(long, default_value = "btcv")]
    labels: String,
    /// Sliding-window size the model was trained with.
    #[arg(long, default_value = "96,96,96", value_name = "D,H,W")]
    roi: String,
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
    super::ensure_distinct(&args.output, &[&args.monai])?;
    let spacing: [f64; 3] = numbers(&args.spacing, "--spacing")?
        .try_into()
        .map_err(|_| anyhow::anyhow!("--spacing takes three numbers X,Y,Z"))?;
    let roi: Vec<usize> = args
        .roi
        .split(',')
        .map(|s| s.trim().parse::<usize>().with_context(|| format!("--roi: `{s}` is not a size")))
        .collect::<anyhow::Result<_>>()?;
    let roi_size: [usize; 3] = roi.try_into().map_err(|_| anyhow::anyhow!("--roi takes three sizes D,H,W"))?;
    let intensity = parse_intensity(&args.intensity)?;
    let labels = parse_labels(&args.labels)?;
    let downsample: Downsample = args.downsample.parse().map_err(anyhow::Error::msg)?;
    let options = MonaiOptions { downsample, normalize: !args.no_normalize };

    let imported = import_monai(&args.monai, options)?;
    let config = imported.config;
    anyhow::ensure!(
        labels.len() == config.out_channels,
        "{} label names given for a network with {} output channels (pass --labels FILE.json)",
        labels.len(),
        config.out_channels
    );
    let name = args
        .name
        .unwrap_or_else(|| args.monai.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    let metadata = Metadata {
        labels,
        axis_codes: args.axis_codes,
        spacing,
        intensity,
        roi_size,
        source: args.monai.file_name().map(|s| s.to_string_lossy().into_owned()),
        ..Metadata::btcv(&name, config.clone())
    };
    metadata.validate().map_err(|e| anyhow::anyhow!("invalid model description: {e}"))?;
    let written = prosam_models::format::save(&args.output, metadata, &imported.tensors)?;
    if !quiet {
        eprintln!(
            "{}: SwinUNETR feature_size {}, depths {:?}, heads {:?}, use_v2 {}, {}, {} parameters, {}",
            args.output.display(),
            config.feature_size,
            config.depths,
            config.num_heads,
            config.use_v2,
            config.downsample,
            config.parameter_count(),
            written.checksum
        );
    }
    Ok(())
}
