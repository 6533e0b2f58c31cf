//! SAM's image-encoder weights, from an official checkpoint (`sam_vit_b_01ec64.pth`: a bare
//! state_dict of SAM's `Sam` module, the encoder under `image_encoder.`) or a safetensors file with
//! the same names, mapped onto the teacher as the reference code's `init_network` does.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::pytorch::read_state_dict;
use crate::autoprosam::Config;
use crate::{Error, Result};

/// The prefix of the encoder's tensors in a SAM checkpoint.
pub const SAM_PREFIX: &str = "image_encoder.";

/// The `image_encoder.*` tensors of a SAM checkpoint, prefix removed.
pub fn read_sam_encoder(path: &Path) -> Result<HashMap<String, Tensor>> {
    let mut magic = [0u8; 4];
    {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        f.read_exact(&mut magic).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    }
    let all: Vec<(String, Tensor)> = if &magic == b"PK\x03\x04" {
        read_state_dict(path, |names| names.iter().any(|n| n.starts_with(SAM_PREFIX)))?
    } else {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("neither a PyTorch zip nor safetensors: {e}"),
            })?
            .into_iter()
            .collect()
    };
    let encoder: HashMap<String, Tensor> =
        all.into_iter().filter_map(|(k, t)| k.strip_prefix(SAM_PREFIX).map(|k| (k.to_string(), t))).collect();
    if encoder.is_empty() {
        return Err(Error::NotTeacher {
            path: path.to_path_buf(),
            reason: format!("no `{SAM_PREFIX}*` tensors: not a SAM checkpoint"),
        });
    }
    Ok(encoder)
}

/// `weights` (every teacher parameter, e.g. freshly initialised) with SAM's encoder loaded over
/// them, shapes checked against `cfg`, and `rel_pos_d = 0.5 * (rel_pos_h + rel_pos_w)` per block,
/// as `init_network` sets it. SAM's `neck.*` and the prompt encoder and mask decoder are not used.
pub fn load_sam_into(
    cfg: &Config,
    mut weights: Vec<(String, Tensor)>,
    sam: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<Vec<(String, Tensor)>> {
    let not_fitting = |reason: String| Error::NotTeacher { path: source.to_path_buf(), reason };
    for (name, t) in weights.iter_mut() {
        if !Config::loads_from_sam(name) {
            continue;
        }
        let key = name.strip_prefix("encoder.").expect("SAM parameters are the encoder's");
        let found = sam.get(key).ok_or_else(|| {
            not_fitting(format!("the SAM checkpoint has no `{SAM_PREFIX}{key}` (shape {:?} expected)", t.dims()))
        })?;
        if found.dims() != t.dims() {
            return Err(not_fitting(format!(
                "`{SAM_PREFIX}{key}` has shape {:?} but the teacher (embed_dim {}, depth {}, SAM img_size {}, window {}) \
                 expects {:?}: a SAM of another size?",
                found.dims(),
                cfg.embed_dim,
                cfg.depth,
                cfg.sam_img_size,
                cfg.sam_window,
                t.dims()
            )));
        }
        *t = found.to_dtype(DType::F32)?;
    }
    let index: HashMap<String, usize> = weights.iter().enumerate().map(|(i, (n, _))| (n.clone(), i)).collect();
    for block in 0..cfg.depth {
        let name = |table: &str| format!("encoder.blocks.{block}.attn.{table}");
        let (h, w) = (&weights[index[&name("rel_pos_h")]].1, &weights[index[&name("rel_pos_w")]].1);
        let d = ((h + w)? * 0.5)?;
        weights[index[&name("rel_pos_d")]].1 = d;
    }
    Ok(weights)
}
