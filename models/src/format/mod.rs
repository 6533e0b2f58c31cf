//! The prosam model file: one safetensors file holding the weights under the source framework's key
//! names (MONAI's for SwinUNETR), with JSON metadata under the `prosam` key of the safetensors
//! header. The metadata carries a SHA-256 of the weights, verified at every load. The file is read
//! into memory, not mapped: a cart that replaces a model in place while another process loads it
//! must cost that load an error, not a SIGBUS.
//!
//! Recomputable buffers (SwinUNETR's `relative_position_index`) are not stored.

pub mod import;
pub mod metadata;
pub mod quantize;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use sha2::{Digest, Sha256};

pub use metadata::{Architecture, BTCV_LABELS, Intensity, Metadata, Precision, QuantizedTensor};

use crate::autoprosam::AutoProSam;
use crate::network::Network;
use crate::ops::ConvArithmetic;
use crate::swin_unetr::SwinUnetr;
use crate::{Error, Result};

/// Version of the file layout and metadata schema; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;

/// The safetensors header key under which the metadata JSON is stored.
pub const METADATA_KEY: &str = "prosam";

/// Little-endian bytes of a tensor, for hashing and writing.
fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match t.dtype() {
        DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::U8 => t.to_vec1::<u8>()?,
        DType::U32 => t.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => return Err(candle_core::Error::Msg(format!("cannot store {other:?} tensors")).into()),
    })
}

/// SHA-256 over the tensors in name order: each name, dtype, shape and little-endian data, so that
/// the checksum does not depend on the file's byte layout and still covers names and shapes.
fn weights_checksum<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a str, &'a [usize], &'a [u8])>) -> String {
    let mut sorted: Vec<_> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = Sha256::new();
    for (name, dtype, shape, data) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(dtype.as_bytes());
        h.update((shape.len() as u64).to_le_bytes());
        for &d in shape {
            h.update((d as u64).to_le_bytes());
        }
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    }
    let digest = h.finalize();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn st_dtype_name(d: safetensors::Dtype) -> String {
    format!("{d:?}")
}

/// Writes `path` with `write` through a temporary file and a rename (see [`crate::temp_file`]).
pub fn write_atomically(path: &Path, write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>) -> Result<()> {
    crate::temp_file::write_via_temp(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        write(&mut f)?;
        f.flush()
    })
}

/// Writes a model file: `tensors` under their names, `metadata` with its checksum filled in.
/// Returns the metadata as written.
pub fn save(path: &Path, mut metadata: Metadata, tensors: &[(String, Tensor)]) -> Result<Metadata> {
    let mut blobs = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype: safetensors::Dtype = t.dtype().into();
        blobs.push((name.as_str(), dtype, t.dims().to_vec(), tensor_bytes(t)?));
    }
    let dtype_names: Vec<String> = blobs.iter().map(|b| st_dtype_name(b.1)).collect();
    metadata.checksum = weights_checksum(
        blobs.iter().zip(&dtype_names).map(|(b, d)| (b.0, d.as_str(), b.2.as_slice(), b.3.as_slice())),
    );
    metadata.format_version = FORMAT_VERSION;
    let views = blobs
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                .map_err(|e| Error::ModelFile { path: path.to_path_buf(), reason: e.to_string() })?;
            Ok((name.to_string(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let json = serde_json::to_string(&metadata).expect("metadata serialises");
    let header = HashMap::from([(METADATA_KEY.to_string(), json)]);
    let bytes = safetensors::serialize(views, Some(header))
        .map_err(|e| Error::ModelFile { path: path.to_path_buf(), reason: e.to_string() })?;
    write_atomically(path, |f| f.write_all(&bytes))?;
    Ok(metadata)
}

/// A model file read into memory (or built into the binary), its metadata parsed, its checksum
/// verified, its architecture checked against the stored tensors and its weights finite.
pub struct ModelFile {
    path: PathBuf,
    bytes: ModelBytes,
    metadata: Metadata,
}

/// Where a model file's bytes live.
enum ModelBytes {
    Read(Vec<u8>),
    /// Compiled into the binary (`include_bytes!`): the runtime's demo model.
    Static(&'static [u8]),
}

impl std::ops::Deref for ModelBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ModelBytes::Read(v) => v,
            ModelBytes::Static(b) => b,
        }
    }
}

/// Reads a whole file whose size must not change while it is read: a model being replaced in
/// place (truncated, then rewritten) is an error that says so.
fn read_stable(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(Error::ModelFile { path: path.to_path_buf(), reason: "not a regular file".into() });
    }
    let size = meta.len();
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(usize::try_from(size).unwrap_or(usize::MAX)).map_err(|_| Error::ModelFile {
        path: path.to_path_buf(),
        reason: format!("cannot allocate {size} bytes to read it"),
    })?;
    (&mut file).take(size).read_to_end(&mut bytes).map_err(io)?;
    let now = file.metadata().map_err(io)?.len();
    if bytes.len() as u64 != size || now != size {
        return Err(Error::ModelFile {
            path: path.to_path_buf(),
            reason: format!(
                "the file changed while it was read ({size} bytes at open, {} read, {now} now); is it being replaced?",
                bytes.len()
            ),
        });
    }
    Ok(bytes)
}

impl std::fmt::Debug for ModelFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelFile").field("path", &self.path).field("metadata", &self.metadata).finish()
    }
}

impl ModelFile {
    /// Reads the file, parses the header and metadata, verifies the weights' checksum, checks the
    /// declared architecture against the stored tensors' names and shapes, and that every weight
    /// is finite.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = read_stable(&path)?;
        Self::parse(path, ModelBytes::Read(bytes))
    }

    /// A model file compiled into the binary; `name` stands for its path in messages.
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Result<Self> {
        Self::parse(PathBuf::from(name), ModelBytes::Static(bytes))
    }

    fn parse(path: PathBuf, bytes: ModelBytes) -> Result<Self> {
        let bad = |reason: String| Error::ModelFile { path: path.clone(), reason };
        let st =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| bad(format!("no `{METADATA_KEY}` metadata in the header (a plain safetensors file, not a prosam model; convert it with `prosam convert`)")))?;
        let metadata: Metadata = serde_json::from_str(json).map_err(|e| bad(format!("metadata: {e}")))?;
        metadata.validate().map_err(|e| bad(format!("metadata: {e}")))?;
        if metadata.format_version > FORMAT_VERSION {
            return Err(bad(format!(
                "format version {} is newer than this prosam reads ({FORMAT_VERSION})",
                metadata.format_version
            )));
        }
        let tensors = st.tensors();
        let dtype_names: Vec<String> = tensors.iter().map(|(_, v)| st_dtype_name(v.dtype())).collect();
        let found = weights_checksum(
            tensors.iter().zip(&dtype_names).map(|((n, v), d)| (n.as_str(), d.as_str(), v.shape(), v.data())),
        );
        if found != metadata.checksum {
            return Err(Error::ChecksumMismatch { path, expected: metadata.checksum.clone(), found });
        }
        let mut infos = HashMap::with_capacity(tensors.len());
        for (name, view) in &tensors {
            if is_q8(name) && view.dtype() != safetensors::Dtype::U8 {
                return Err(bad(format!("`{name}` holds {:?} values, not Q8_0 bytes", view.dtype())));
            }
            infos.insert(name.clone(), stored_shape(name, view.shape()));
        }
        check_weights(&metadata.architecture.parameter_shapes(), &infos, &metadata.quantized, &path)?;
        for (name, view) in &tensors {
            check_finite(name, view).map_err(&bad)?;
        }
        drop(st);
        Ok(Self { path, bytes, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Size of the file in bytes.
    pub fn file_size(&self) -> usize {
        self.bytes.len()
    }

    fn safetensors(&self) -> Result<safetensors::SafeTensors<'_>> {
        safetensors::SafeTensors::deserialize(&self.bytes)
            .map_err(|e| Error::ModelFile { path: self.path.clone(), reason: e.to_string() })
    }

    /// Name, dtype and shape of every stored tensor, in name order.
    pub fn tensor_infos(&self) -> Result<Vec<(String, safetensors::Dtype, Vec<usize>)>> {
        let mut infos: Vec<_> =
            self.safetensors()?.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec())).collect();
        infos.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(infos)
    }

    /// Every tensor, copied out of the file's bytes onto `device`.
    pub fn tensors(&self, device: &Device) -> Result<HashMap<String, Tensor>> {
        let st = self.safetensors()?;
        let mut out = HashMap::new();
        for (name, view) in st.tensors() {
            let dtype = DType::try_from(view.dtype())?;
            out.insert(name, Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?);
        }
        Ok(out)
    }

    /// Builds the network this file describes, computing in `dtype` on `device`. An int8
    /// student's conv blocks compute in 16-bit integers where the CPU can ([`ConvArithmetic::Int16`]).
    pub fn network(&self, dtype: DType, device: &Device) -> Result<Network> {
        let tensors = self.tensors(device)?;
        let arch = &self.metadata.architecture;
        let vb = VarBuilder::from_tensors(tensors, dtype, device);
        Ok(match arch {
            Architecture::SwinUnetr(config) => {
                let mut net = SwinUnetr::new(config, vb)?;
                if self.metadata.precision == Precision::Int8 {
                    net.set_conv_arithmetic(ConvArithmetic::Int16);
                }
                Network::SwinUnetr(net)
            }
            Architecture::AutoProSam(config) => Network::AutoProSam(AutoProSam::new(config, vb)?),
        })
    }

    /// Builds the SwinUNETR this file describes; a teacher file is refused.
    pub fn swin_unetr(&self, dtype: DType, device: &Device) -> Result<SwinUnetr> {
        match self.network(dtype, device)? {
            Network::SwinUnetr(net) => Ok(net),
            other => Err(Error::ModelFile {
                path: self.path.clone(),
                reason: format!("it holds a {} network, not a SwinUNETR student", other.architecture_name()),
            }),
        }
    }
}

/// A stored tensor's shape as [`check_weights`] compares it: the shape itself, or for Q8_0
/// blocks (`KEY.q8_0`) their byte count.
fn stored_shape(name: &str, shape: &[usize]) -> Vec<usize> {
    if is_q8(name) { vec![shape.iter().product()] } else { shape.to_vec() }
}

/// Whether a stored tensor's name marks Q8_0 blocks (`KEY.q8_0`).
fn is_q8(name: &str) -> bool {
    name.strip_suffix(crate::ops::quantized::Q8_SUFFIX).is_some_and(|key| key.ends_with('.'))
}

/// Refuses a stored float tensor with a NaN or an infinity (in a Q8_0 tensor, a block scale),
/// naming the tensor, the count and the first element.
fn check_finite(name: &str, view: &safetensors::tensor::TensorView<'_>) -> std::result::Result<(), String> {
    use crate::ops::quantized::Q8_BLOCK_BYTES;
    use safetensors::Dtype;
    let data = view.data();
    let (count, first) = match view.dtype() {
        Dtype::F32 => {
            count_non_finite(data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()).is_finite()))
        }
        Dtype::F64 => {
            count_non_finite(data.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap()).is_finite()))
        }
        Dtype::F16 => {
            count_non_finite(data.chunks_exact(2).map(|b| half::f16::from_le_bytes(b.try_into().unwrap()).is_finite()))
        }
        Dtype::BF16 => {
            count_non_finite(data.chunks_exact(2).map(|b| half::bf16::from_le_bytes(b.try_into().unwrap()).is_finite()))
        }
        // Q8_0 blocks: an f16 scale, then 32 int8 values.
        Dtype::U8 => count_non_finite(
            data.chunks_exact(Q8_BLOCK_BYTES).map(|b| half::f16::from_le_bytes([b[0], b[1]]).is_finite()),
        ),
        _ => (0, 0),
    };
    if count > 0 {
        return Err(format!(
            "tensor `{name}` holds {count} non-finite value(s) (NaN or infinite), the first at element {first}"
        ));
    }
    Ok(())
}

/// How many of `finite` are false, and the index of the first.
fn count_non_finite(finite: impl Iterator<Item = bool>) -> (usize, usize) {
    let (mut count, mut first) = (0, 0);
    for (i, ok) in finite.enumerate() {
        if !ok {
            if count == 0 {
                first = i;
            }
            count += 1;
        }
    }
    (count, first)
}

/// Checks that `tensors` (their shapes, by name) hold every parameter of `expected`, each with its
/// shape, either dense or, for the keys in `quantized`, as Q8_0 blocks of the right size (byte
/// tensors are given by their byte count); the errors name the key and both shapes. Tensors the
/// network does not use are reported too. Run on the file's header, before any tensor is built.
pub fn check_weights(
    expected: &[(String, Vec<usize>)],
    tensors: &HashMap<String, Vec<usize>>,
    quantized: &std::collections::BTreeMap<String, QuantizedTensor>,
    path: &Path,
) -> Result<()> {
    use crate::ops::quantized::{Q8_BLOCK, Q8_BLOCK_BYTES, Q8_SUFFIX, padded_cols};
    let bad = |reason: String| Error::ModelFile { path: path.to_path_buf(), reason };
    let mut used = std::collections::HashSet::new();
    for (key, shape) in expected {
        if let Some(q) = quantized.get(key) {
            if q.encoding != Q8_SUFFIX {
                return Err(bad(format!("`{key}` has the unknown encoding `{}`", q.encoding)));
            }
            if &q.shape != shape {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    expected: shape.clone(),
                    found: q.shape.clone(),
                });
            }
            let q_key = format!("{key}.{Q8_SUFFIX}");
            let t = tensors
                .get(&q_key)
                .ok_or_else(|| bad(format!("the metadata lists `{key}` as int8 but the file has no `{q_key}`")))?;
            let rows = shape[0];
            let cols: usize = shape[1..].iter().product();
            let bytes = rows * padded_cols(cols) / Q8_BLOCK * Q8_BLOCK_BYTES;
            if t.as_slice() != [bytes] {
                return Err(bad(format!("`{q_key}` has shape {t:?}, expected {bytes} Q8_0 bytes for {shape:?}")));
            }
            used.insert(q_key);
            continue;
        }
        match tensors.get(key) {
            None => {
                return Err(Error::MissingTensor {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    expected: shape.clone(),
                });
            }
            Some(t) if t != shape => {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    expected: shape.clone(),
                    found: t.clone(),
                });
            }
            Some(_) => {
                used.insert(key.clone());
            }
        }
    }
    if tensors.len() > used.len() {
        let mut extra: Vec<&str> = tensors.keys().map(String::as_str).filter(|k| !used.contains(*k)).collect();
        extra.sort();
        return Err(bad(format!("tensors the metadata does not account for: {}", extra.join(", "))));
    }
    Ok(())
}
