//! MONAI SwinUNETR checkpoints: the released BTCV ones (`{"state_dict": ...}`), bare state_dicts,
//! DataParallel's `module.` prefix and the old `fc1`/`fc2` MLP names. The configuration is
//! inferred from the tensors; what they cannot reveal comes from [`MonaiOptions`].

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::pytorch::read_state_dict;
use crate::format::check_weights;
use crate::swin_unetr::{Config, Downsample};
use crate::{Error, Result};

/// What a SwinUNETR state_dict does not record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonaiOptions {
    pub downsample: Downsample,
    pub normalize: bool,
}

impl Default for MonaiOptions {
    /// MONAI's defaults, which the released BTCV checkpoints use.
    fn default() -> Self {
        Self { downsample: Downsample::Merging, normalize: true }
    }
}

/// An imported checkpoint: the inferred configuration and the learned parameters (f32), in
/// MONAI's module order.
#[derive(Debug, Clone)]
pub struct MonaiImport {
    pub config: Config,
    pub tensors: Vec<(String, Tensor)>,
}

const PATCH_EMBED: &str = "swinViT.patch_embed.proj.weight";

/// MONAI's current key for an old or wrapped one.
fn canonical_key(key: &str) -> String {
    let key = key.strip_prefix("module.").unwrap_or(key);
    key.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
}

/// Reads a MONAI SwinUNETR checkpoint and checks every tensor against the inferred configuration.
pub fn import_monai(path: &Path, options: MonaiOptions) -> Result<MonaiImport> {
    let raw = read_state_dict(path, |names| names.iter().any(|n| canonical_key(n) == PATCH_EMBED))?;
    from_state_dict(raw, options, path)
}

/// [`import_monai`] on a state_dict already in memory; `source` names it in errors.
pub fn from_state_dict(state_dict: Vec<(String, Tensor)>, options: MonaiOptions, source: &Path) -> Result<MonaiImport> {
    let path = source;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in state_dict {
        if name.ends_with("relative_position_index") {
            continue; // a deterministic buffer, recomputed at load
        }
        tensors.insert(canonical_key(&name), t);
    }
    let config = infer_config(&tensors, options).map_err(|reason| {
        let mut keys: Vec<&str> = tensors.keys().map(String::as_str).collect();
        keys.sort();
        let sample = keys.iter().take(4).copied().collect::<Vec<_>>().join(", ");
        Error::NotSwinUnetr {
            path: path.to_path_buf(),
            reason: format!("{reason}; it holds {} tensors such as {sample}", keys.len()),
        }
    })?;
    config.validate()?;
    let shapes = tensors.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    check_weights(&config.parameter_shapes(), &shapes, &Default::default(), path)?;
    let ordered = config
        .parameter_shapes()
        .into_iter()
        .map(|(key, _)| {
            let t = tensors.remove(&key).expect("checked above").to_dtype(DType::F32)?;
            Ok((key, t))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(MonaiImport { config, tensors: ordered })
}

/// Feature size, channels, depths, heads, window and `use_v2` from the tensors' names and shapes.
fn infer_config(t: &HashMap<String, Tensor>, options: MonaiOptions) -> std::result::Result<Config, String> {
    let dims = |key: &str| t.get(key).map(|x| x.dims().to_vec());
    let patch = dims(PATCH_EMBED).ok_or_else(|| format!("it has no `{PATCH_EMBED}`"))?;
    let &[feature_size, in_channels, 2, 2, 2] = patch.as_slice() else {
        return Err(format!("`{PATCH_EMBED}` has shape {patch:?}, expected (F, in_channels, 2, 2, 2)"));
    };
    let out_key = "out.conv.conv.weight";
    let out =
        dims(out_key).ok_or_else(|| format!("it has no `{out_key}` (a Swin encoder without the UNETR decoder?)"))?;
    let out_channels = out[0];
    let mut depths = [0; 4];
    let mut num_heads = [0; 4];
    let mut window_size = 0;
    for s in 0..4 {
        while t.contains_key(&format!("swinViT.layers{}.0.blocks.{}.norm1.weight", s + 1, depths[s])) {
            depths[s] += 1;
        }
        let table_key = format!("swinViT.layers{}.0.blocks.0.attn.relative_position_bias_table", s + 1);
        let table = dims(&table_key).ok_or_else(|| format!("it has no `{table_key}`"))?;
        let &[rows, heads] = table.as_slice() else {
            return Err(format!("`{table_key}` has shape {table:?}, expected ((2w-1)^3, heads)"));
        };
        let span = (rows as f64).cbrt().round() as usize;
        if span.pow(3) != rows || span.is_multiple_of(2) {
            return Err(format!("`{table_key}` has {rows} rows, not (2w-1)^3 for a cubic window w"));
        }
        let w = span.div_ceil(2);
        if s > 0 && w != window_size {
            return Err(format!("stage {} uses window {w} but stage 1 uses {window_size}", s + 1));
        }
        window_size = w;
        num_heads[s] = heads;
    }
    let use_v2 = t.contains_key("swinViT.layers1c.0.layer.conv1.conv.weight");
    Ok(Config {
        in_channels,
        out_channels,
        feature_size,
        depths,
        num_heads,
        window_size,
        use_v2,
        downsample: options.downsample,
        normalize: options.normalize,
    })
}
