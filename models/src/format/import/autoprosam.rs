//! Importing the AutoProSAM teacher from the reference code's checkpoints: either one flat dict
//! with the `encoder.`, `feature.` and `decoder.` prefixes (`../shared/fixtures/autoprosam/`), or
//! the training script's `{encoder_dict, feature_dict, decoder_dict, ...}` (`last.pth.tar`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::pytorch::{read_state_dict, read_state_dict_at};
use crate::autoprosam::Config;
use crate::ops::window::compute_shift_mask;
use crate::{Error, Result};

/// The three modules of a training checkpoint: prefix in the flat layout, key in the nested one.
pub const TEACHER_PARTS: [(&str, &str); 3] =
    [("encoder.", "encoder_dict"), ("feature.", "feature_dict"), ("decoder.", "decoder_dict")];

/// Every parameter of `cfg`, f32, in [`Config::parameter_shapes`] order.
#[derive(Debug)]
pub struct TeacherImport {
    pub tensors: Vec<(String, Tensor)>,
    /// How many stored shift-mask buffers (`attn_mask`) were checked against the recomputed ones.
    pub masks_checked: usize,
}

/// Reads a reference checkpoint and checks every tensor against `cfg`.
pub fn import_autoprosam(path: &Path, cfg: &Config) -> Result<TeacherImport> {
    cfg.validate()?;
    let flat = read_state_dict(path, |names| names.iter().any(|n| n.starts_with("encoder.")))?;
    let tensors: HashMap<String, Tensor> = if flat.iter().any(|(n, _)| n.starts_with("encoder.")) {
        flat.into_iter().collect()
    } else {
        let mut joined = HashMap::new();
        for (prefix, key) in TEACHER_PARTS {
            let Some(part) = read_state_dict_at(path, key)? else {
                return Err(Error::NotTeacher {
                    path: path.to_path_buf(),
                    reason: format!(
                        "it has neither `encoder.*` tensors nor the training checkpoint's `{key}` (keys such as {})",
                        sample_keys(flat.iter().map(|(n, _)| n.as_str()))
                    ),
                });
            };
            joined.extend(part.into_iter().map(|(n, t)| (format!("{prefix}{n}"), t)));
        }
        joined
    };
    from_state_dict(tensors, cfg, path)
}

/// [`import_autoprosam`] on tensors already in memory; `source` names them in errors.
pub fn from_state_dict(mut tensors: HashMap<String, Tensor>, cfg: &Config, source: &Path) -> Result<TeacherImport> {
    let not_teacher = |reason: String| Error::NotTeacher { path: source.to_path_buf(), reason };
    let t = cfg.token_grid();
    let (w, s) = (cfg.cubic_window, cfg.cubic_window / 2);
    let mut masks_checked = 0;
    for block in 0..cfg.depth {
        // A derived buffer: dropped, and compared with the mask the network recomputes, which
        // catches a checkpoint made for another token grid or window.
        let Some(stored) = tensors.remove(&format!("encoder.blocks.{block}.attn_mask")) else { continue };
        let expected = compute_shift_mask([t; 3], [w; 3], [s; 3], &Device::Cpu)?;
        let same = stored.dims() == expected.dims()
            && stored.to_dtype(DType::F32)?.sub(&expected)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0;
        if !same || !cfg.shifted(block) {
            return Err(not_teacher(format!(
                "block {block}'s stored shift mask {:?} is not the one of a {t}^3 token grid in windows of {w} \
                 (a checkpoint of another preset or crop?)",
                stored.dims()
            )));
        }
        masks_checked += 1;
    }
    let expected = cfg.parameter_shapes();
    let describe = || {
        format!(
            "this configuration (embed_dim {}, depth {}, heads {}, crop {}, n_out {})",
            cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.crop, cfg.n_out
        )
    };
    let mut ordered = Vec::with_capacity(expected.len());
    for (key, shape) in &expected {
        let Some(t) = tensors.remove(key) else {
            return Err(not_teacher(format!("it has no `{key}`, which {} needs with shape {shape:?}", describe())));
        };
        if t.dims() != shape.as_slice() {
            return Err(not_teacher(format!(
                "`{key}` has shape {:?} but {} expects {shape:?}: a checkpoint of another preset or crop?",
                t.dims(),
                describe()
            )));
        }
        ordered.push((key.clone(), t.to_dtype(DType::F32)?));
    }
    if !tensors.is_empty() {
        return Err(not_teacher(format!(
            "{} tensors that {} does not have, such as {}",
            tensors.len(),
            describe(),
            sample_keys(tensors.keys().map(String::as_str))
        )));
    }
    Ok(TeacherImport { tensors: ordered, masks_checked })
}

/// Up to four names, sorted, for error messages.
fn sample_keys<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let mut names: Vec<&str> = names.collect();
    names.sort();
    let mut sample = names.iter().take(4).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
    if names.is_empty() {
        sample = "none".into();
    }
    sample
}
