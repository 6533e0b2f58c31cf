//! Training data: datasets in the Medical Segmentation Decathlon layout (a `dataset.json` with
//! `training` and `validation` lists of `{image, label}` NIfTI pairs, paths relative to the file,
//! as MONAI's `load_decathlon_datalist` reads them), label maps, and cases brought onto the
//! model's grid (RAS, model spacing; images stay in HU so that each network normalises its own
//! way), with an on-disk cache of those preprocessed volumes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use prosam_models::format::Metadata;
use prosam_runtime::engine::{labels_to_model_grid, to_model_grid};
use prosam_runtime::volume::{Volume, nifti};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// One image/label pair.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub image: PathBuf,
    pub label: PathBuf,
}

impl Entry {
    /// The image's file name without `.nii`/`.nii.gz`, for logs.
    pub fn name(&self) -> String {
        let name = self.image.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        name.trim_end_matches(".gz").trim_end_matches(".nii").to_string()
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub training: Vec<Entry>,
    pub validation: Vec<Entry>,
    /// The `labels` object, when the file has one: class number to name.
    pub labels: Option<BTreeMap<usize, String>>,
    /// `name: description` from the Decathlon fields, for the trained model's provenance.
    pub about: Option<String>,
    /// The `licence` (or `license`) field: the terms a model trained on the data inherits.
    pub licence: Option<String>,
}

impl Dataset {
    /// Reads `dataset.json`; every listed file must exist.
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Dataset { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let list = |key: &str| -> Result<Vec<Entry>> {
            let Some(items) = json.get(key) else { return Ok(Vec::new()) };
            let items = items.as_array().ok_or_else(|| bad(format!("`{key}` is not a list")))?;
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let file = |field: &str| -> Result<PathBuf> {
                        let rel = item
                            .get(field)
                            .and_then(|v| v.as_str())
                            .ok_or_else(|| bad(format!("`{key}[{i}]` has no `{field}` path")))?;
                        let p = base.join(rel);
                        if !p.is_file() {
                            return Err(bad(format!("`{key}[{i}].{field}`: {} does not exist", p.display())));
                        }
                        Ok(p)
                    };
                    Ok(Entry { image: file("image")?, label: file("label")? })
                })
                .collect()
        };
        let training = list("training")?;
        if training.is_empty() {
            return Err(bad("the `training` list is missing or empty".into()));
        }
        let validation = list("validation")?;
        let labels = match json.get("labels") {
            Some(serde_json::Value::Object(map)) => Some(
                map.iter()
                    .map(|(k, v)| {
                        let n = k.parse::<usize>().map_err(|_| bad(format!("`labels` key `{k}` is not a number")))?;
                        Ok((n, v.as_str().unwrap_or_default().to_string()))
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => None,
        };
        let text = |key: &str| json.get(key).and_then(|v| v.as_str()).map(str::trim).filter(|t| !t.is_empty());
        let about = match (text("name"), text("description")) {
            (Some(name), Some(description)) => Some(format!("{name}: {description}")),
            (name, description) => name.or(description).map(str::to_string),
        };
        let licence = text("licence").or_else(|| text("license")).map(str::to_string);
        Ok(Self { path: path.to_path_buf(), training, validation, labels, about, licence })
    }
}

pub use prosam_runtime::label_map::LabelMap;

/// A case on the model's grid: the image in HU and the labels (C order, `dims`).
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub image: Vec<f32>,
    pub labels: Vec<u8>,
    pub dims: [usize; 3],
}

/// Largest difference in mm between two affines' entries that still counts as the same grid.
const AFFINE_TOLERANCE_MM: f64 = 1e-3;

fn read_volume(path: &Path) -> Result<Volume> {
    Ok(nifti::read(path)?.volume)
}

/// Reads a pair, checks it, remaps and checks its labels, and brings both onto the model grid
/// that `metadata` describes. With `cache`, the result is stored there and reused while the
/// files, the metadata's grid and the label map stay the same.
pub fn load_case(
    entry: &Entry,
    metadata: &Metadata,
    label_map: Option<&LabelMap>,
    cache: Option<&Path>,
) -> Result<Case> {
    let key = cache.map(|dir| cache_key(entry, metadata, label_map).map(|k| dir.join(format!("{k}.safetensors"))));
    let key = key.transpose()?;
    if let Some(Ok(case)) = key.as_ref().filter(|f| f.is_file()).map(|f| read_cached(f, entry)) {
        return Ok(case);
    }
    let image = read_volume(&entry.image)?;
    let mut label = read_volume(&entry.label)?;
    let bad = |reason: String| Error::Dataset { path: entry.label.clone(), reason };
    if image.dims != label.dims {
        return Err(bad(format!(
            "labels of shape {:?} for an image of shape {:?} ({})",
            label.dims,
            image.dims,
            entry.image.display()
        )));
    }
    let worst = (0..3)
        .flat_map(|r| (0..4).map(move |c| (r, c)))
        .map(|(r, c)| (image.affine.0[r][c] - label.affine.0[r][c]).abs())
        .fold(0.0, f64::max);
    if worst > AFFINE_TOLERANCE_MM {
        return Err(bad(format!(
            "the label map's affine differs from the image's ({}) by up to {worst:.4} mm: they are not on the same grid",
            entry.image.display()
        )));
    }
    let classes = metadata.labels.len();
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for v in &mut label.data {
        if *v < 0.0 || v.fract() != 0.0 || *v > 255.0 {
            return Err(bad(format!("label value {v} is not a class number in 0..=255")));
        }
        let mapped = label_map.map_or(*v as u8, |m| m.apply(*v as u8));
        if mapped as usize >= classes {
            *counts.entry(mapped as u32).or_default() += 1;
        }
        *v = mapped as f32;
    }
    if let Some((&value, &n)) = counts.iter().next() {
        return Err(bad(format!(
            "label {value} ({n} voxels{}) is outside the model's {classes} classes 0..{}{}",
            if counts.len() > 1 { format!(", and {} other values", counts.len() - 1) } else { String::new() },
            classes - 1,
            if label_map.is_some() { " after the label map" } else { "; pass --label-map to renumber" }
        )));
    }
    let grid = to_model_grid(metadata, &image);
    let (labels, dims) = labels_to_model_grid(metadata, &label);
    debug_assert_eq!(dims, grid.dims);
    let case = Case { name: entry.name(), image: grid.data, labels, dims };
    if let Some(file) = &key {
        write_cached(file, &case)?;
    }
    Ok(case)
}

fn file_stamp(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    Ok(format!("{}|{}|{:?}", canonical.display(), meta.len(), modified))
}

fn cache_key(entry: &Entry, metadata: &Metadata, label_map: Option<&LabelMap>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(file_stamp(&entry.image)?);
    h.update(file_stamp(&entry.label)?);
    h.update(format!("{:?}|{}", metadata.spacing, metadata.labels.len()));
    h.update(label_map.map(LabelMap::key).unwrap_or_default());
    Ok(h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect())
}

fn read_cached(file: &Path, entry: &Entry) -> Result<Case> {
    let t = candle_core::safetensors::load(file, &Device::Cpu)?;
    let (Some(image), Some(labels)) = (t.get("image"), t.get("labels")) else {
        return Err(Error::Dataset { path: file.to_path_buf(), reason: "incomplete cache entry".into() });
    };
    let (d0, d1, d2) = image.dims3()?;
    Ok(Case {
        name: entry.name(),
        image: image.flatten_all()?.to_vec1()?,
        labels: labels.flatten_all()?.to_vec1()?,
        dims: [d0, d1, d2],
    })
}

fn write_cached(file: &Path, case: &Case) -> Result<()> {
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
    }
    let image = Tensor::from_slice(&case.image, case.dims.to_vec(), &Device::Cpu)?;
    let labels = Tensor::from_slice(&case.labels, case.dims.to_vec(), &Device::Cpu)?;
    let tensors: HashMap<String, Tensor> = [("image".to_string(), image), ("labels".to_string(), labels)].into();
    let bytes = safetensors::serialize(tensors.iter().map(|(k, t)| (k.clone(), t)).collect::<Vec<_>>(), None)
        .map_err(|e| Error::Dataset { path: file.to_path_buf(), reason: e.to_string() })?;
    prosam_models::format::write_atomically(file, |f| std::io::Write::write_all(f, &bytes))?;
    Ok(())
}
