//! `prosam info`: what a model file holds.

use std::path::PathBuf;

use prosam_models::format::{Architecture, ModelFile};

#[derive(clap::Args)]
pub struct Args {
    /// The prosam model file (default: the built-in model).
    #[arg(short, long, value_name = "MODEL")]
    model: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let file = match &args.model {
        Some(path) => ModelFile::open(path)?,
        None => prosam_runtime::zoo::built_in_model()?,
    };
    let path = file.path().to_path_buf();
    let meta = file.metadata();
    let parameters = meta.architecture.parameter_count();
    let tensors = file.tensor_infos()?;
    if args.json {
        let report = serde_json::json!({
            "path": path.to_string_lossy(),
            "file_bytes": file.file_size(),
            "parameters": parameters,
            "tensors": tensors.len(),
            "precision": meta.precision,
            "metadata": meta,
        });
        outln!("{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    outln!("model        {}", meta.name)?;
    outln!(
        "file         {} ({:.1} MiB, format version {})",
        path.display(),
        file.file_size() as f64 / 1048576.0,
        meta.format_version
    )?;
    match &meta.architecture {
        Architecture::SwinUnetr(cfg) => outln!(
            "architecture SwinUNETR feature_size {}, depths {:?}, heads {:?}, window {}, use_v2 {}, downsample {}, normalize {}",
            cfg.feature_size,
            cfg.depths,
            cfg.num_heads,
            cfg.window_size,
            cfg.use_v2,
            cfg.downsample,
            cfg.normalize
        )?,
        Architecture::AutoProSam(cfg) => {
            outln!(
                "architecture AutoProSAM teacher: ViT {} dim, {} blocks, {} heads, crop {}^3 -> {}^3 tokens in windows of {}, taps after blocks {:?}",
                cfg.embed_dim,
                cfg.depth,
                cfg.num_heads,
                cfg.crop,
                cfg.token_grid(),
                cfg.cubic_window,
                cfg.taps
            )?;
            outln!(
                "             necks {}, APG base {} (scales {:?}) on {:?}, decoder {}",
                cfg.out_chans,
                cfg.apg_base,
                cfg.apg_scales,
                cfg.apg_input,
                cfg.decoder_channels
            )?;
            outln!(
                "trainable    stage 1: {} parameters; stage 2: {}; the rest frozen (SAM)",
                cfg.trainable_count(1),
                cfg.trainable_count(2)
            )?;
        }
    }
    outln!("channels     {} in, {} out", meta.architecture.in_channels(), meta.architecture.out_channels())?;
    outln!("parameters   {parameters} in {} tensors", tensors.len())?;
    outln!("precision    {}", meta.precision)?;
    outln!("spacing      {:?} mm, axes {}", meta.spacing, meta.axis_codes)?;
    outln!("roi          {:?}", meta.roi_size)?;
    outln!("intensity    {}", meta.intensity)?;
    outln!(
        "labels       {}",
        meta.labels.iter().enumerate().map(|(i, l)| format!("{i}:{l}")).collect::<Vec<_>>().join(" ")
    )?;
    outln!("checksum     {} (verified)", meta.checksum)?;
    for (field, text) in
        [("trained on", &meta.training_data), ("licence", &meta.licence), ("intended use", &meta.intended_use)]
    {
        if let Some(text) = text {
            outln!("{field:<12} {text}")?;
        }
    }
    if let Some(source) = &meta.source {
        outln!(
            "source       {source}{}",
            meta.writer.as_deref().map(|w| format!(", converted by {w}")).unwrap_or_default()
        )?;
    }
    Ok(())
}
