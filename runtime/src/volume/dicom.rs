//! DICOM CT series input: the image series in a folder, the checks that make a series one volume,
//! and the volume in HU with its RAS affine.
//!
//! Voxel layout (dcm2niix's, which TotalSegmentator and most NIfTI tools share): axis 0 runs
//! along a row (the column index), axis 1 runs against the stored row order (last row first),
//! axis 2 runs through the slices in increasing position along the slice normal
//! (row direction x column direction). The affine maps that index to RAS millimetres, from
//! DICOM's LPS patient space (x and y negated).

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use dicom_pixeldata::{ConvertOptions, ModalityLutOption, PixelDecoder};
use rayon::prelude::*;

use super::{Affine, Volume};
use crate::memory::{self, Admit, MemoryBudget, VolumeShape};
use crate::{Error, Result};

/// Relative tolerance for pixel spacing, orientation and slice spacing to count as equal.
const GEOMETRY_TOLERANCE: f64 = 1e-2;
/// Orientation cosines within this of each other count as one orientation.
const ORIENTATION_TOLERANCE: f64 = 1e-4;
/// Stacks whose slice step leaves the slice normal by more than this are gantry-tilted (sheared).
const MAX_TILT_DEGREES: f64 = 0.05;

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::Dicom { path: path.to_path_buf(), reason: reason.into() }
}

/// Patient and study attributes a derived object (a DICOM-SEG) copies from its source.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct StudyInfo {
    pub patient_name: String,
    pub patient_id: String,
    pub patient_birth_date: String,
    pub patient_sex: String,
    pub study_instance_uid: String,
    pub study_date: String,
    pub study_time: String,
    pub study_id: String,
    pub accession_number: String,
    pub referring_physician_name: String,
}

/// One image file of a series, from its header.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Slice {
    #[serde(serialize_with = "crate::volume::lossy_path")]
    pub path: PathBuf,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub modality: String,
    pub transfer_syntax: String,
    pub instance_number: Option<i64>,
    pub rows: usize,
    pub columns: usize,
    /// ImagePositionPatient: the centre of the first stored pixel, LPS mm.
    pub position: [f64; 3],
    /// ImageOrientationPatient: row direction then column direction, LPS.
    pub orientation: [f64; 6],
    /// PixelSpacing: between rows, then between columns, mm.
    pub pixel_spacing: [f64; 2],
    pub slope: f64,
    pub intercept: f64,
    pub samples_per_pixel: u16,
    pub photometric: String,
}

/// The slice geometry of a series that reads to one volume.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Geometry {
    /// Columns, rows, slices.
    pub dims: [usize; 3],
    /// Voxel (i, j, k) to RAS mm, in the layout the module documents.
    #[serde(skip)]
    pub affine: Affine,
    /// Between columns, between rows, between slices (mm).
    pub spacing: [f64; 3],
    /// The slices in volume order (axis 2).
    #[serde(skip)]
    pub order: Vec<usize>,
}

/// An image series found in a folder.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Series {
    /// SeriesInstanceUID; empty when the files carry none (some anonymisers blank it).
    pub uid: String,
    pub number: Option<i64>,
    pub description: String,
    pub modality: String,
    pub frame_of_reference_uid: String,
    pub study: StudyInfo,
    /// In the order the files were found; [`Geometry::order`] gives the volume order.
    pub slices: Vec<Slice>,
}

/// A file under the folder that is not a slice of an image series, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ignored {
    #[serde(serialize_with = "crate::volume::lossy_path")]
    pub path: PathBuf,
    pub reason: String,
}

/// What a folder holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scan {
    #[serde(serialize_with = "crate::volume::lossy_path")]
    pub folder: PathBuf,
    pub series: Vec<Series>,
    pub ignored: Vec<Ignored>,
}

/// A series read into a volume.
#[derive(Debug, Clone)]
pub struct DicomInput {
    pub volume: Volume,
    pub series: Series,
    pub geometry: Geometry,
}

fn text(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.element_opt(tag)
        .ok()
        .flatten()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
        .unwrap_or_default()
}

fn floats(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<Vec<f64>> {
    obj.element_opt(tag).ok().flatten().and_then(|e| e.to_multi_float64().ok())
}

fn int(obj: &DefaultDicomObject, tag: dicom_core::Tag) -> Option<i64> {
    obj.element_opt(tag).ok().flatten().and_then(|e| e.to_int::<i64>().ok())
}

/// What `read_header` found in one file.
enum Header {
    Slice(Box<(Slice, SeriesKey)>),
    NotASlice(String),
}

/// The attributes that belong to a series rather than to a slice.
#[derive(Debug, Clone)]
struct SeriesKey {
    uid: String,
    number: Option<i64>,
    description: String,
    frame_of_reference_uid: String,
    study: StudyInfo,
}

/// Walks a DICOM file's element headers and checks every defined length against the bytes
/// that remain. dicom-rs 0.10 zero-fills an element's declared length before reading it, so a
/// 6 KB file claiming a 4 GB element would cost 4 GB of memory. Deflated data sets are refused.
/// [`scan`] walks every file it lists (pixel data included), so the series reader does not walk
/// them again.
fn check_element_lengths(path: &Path) -> std::result::Result<(), String> {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    use std::io::{BufReader, Read, Seek};
    const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let size = file.metadata().map_err(|e| format!("cannot stat: {e}"))?.len();
    let mut r = BufReader::new(file);
    // Where dicom-rs starts: after "DICM" at byte 128 (a preamble) or at byte 0 (none).
    let mut head = Vec::with_capacity(132);
    (&mut r).take(132).read_to_end(&mut head).map_err(|e| format!("cannot read: {e}"))?;
    let start = if head.len() == 132 && &head[128..] == b"DICM" {
        132
    } else if head.starts_with(b"DICM") {
        4
    } else {
        return Ok(()); // not DICOM: the parser says so
    };
    r.seek(std::io::SeekFrom::Start(start)).map_err(|e| format!("cannot read: {e}"))?;
    let (mut pos, mut in_meta, mut explicit, mut big) = (start, true, true, false);
    let mut syntax = String::new();
    let mut in_pixels = false;
    let dictionary = dicom_dictionary_std::StandardDataDictionary;
    loop {
        let mut tag = [0u8; 4];
        match r.read_exact(&mut tag) {
            Ok(()) => {}
            Err(_) => return Ok(()), // the end, or a short tail the parser reports
        }
        let le_group = u16::from_le_bytes([tag[0], tag[1]]);
        if in_meta && le_group != 2 {
            in_meta = false;
            let syntax = syntax.trim_end_matches(['\0', ' ']);
            if syntax == DEFLATED {
                // Its lengths refer to an inflated stream whose size only inflating it would tell.
                return Err(format!("a deflated data set (transfer syntax {DEFLATED}), which prosam does not read"));
            }
            explicit = syntax != "1.2.840.10008.1.2";
            big = syntax == "1.2.840.10008.1.2.2";
        }
        let u16_at = |b: [u8; 2]| if big { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) };
        let u32_at = |b: [u8; 4]| if big { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) };
        let (group, element) = (u16_at([tag[0], tag[1]]), u16_at([tag[2], tag[3]]));
        let mut rest = [0u8; 4];
        r.read_exact(&mut rest).map_err(|_| format!("truncated element header at byte {pos}"))?;
        pos += 8;
        let (vr, len) = if group == 0xfffe || !explicit {
            (None, u32_at(rest))
        } else {
            let vr = [rest[0], rest[1]];
            // dicom-rs's rule: these VRs have a 16-bit length; every other code, unknown ones
            // included (read as UN), has two reserved bytes and a 32-bit length.
            let short = [
                b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN", b"SH",
                b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
            ];
            if !short.contains(&&vr) {
                let mut long = [0u8; 4];
                r.read_exact(&mut long).map_err(|_| format!("truncated element header at byte {pos}"))?;
                pos += 4;
                (Some(vr), u32_at(long))
            } else {
                (Some(vr), u16_at([rest[2], rest[3]]) as u32)
            }
        };
        let remaining = size.saturating_sub(pos);
        if len == u32::MAX {
            // Undefined length: a sequence, or encapsulated pixel data; its content follows.
            in_pixels |= (group, element) == (0x7fe0, 0x0010);
            continue;
        }
        if len as u64 > remaining {
            return Err(format!(
                "element ({group:04X},{element:04X}) at byte {} claims {len} bytes; {remaining} remain in the file",
                pos - 8
            ));
        }
        let is_sequence = match vr {
            Some(vr) => &vr == b"SQ",
            None => dictionary
                .by_tag(dicom_core::Tag(group, element))
                .is_some_and(|e| e.vr().relaxed() == dicom_core::VR::SQ),
        };
        let descend = match (group, element) {
            (0xfffe, 0xe0dd) => {
                in_pixels = false;
                true
            }
            (0xfffe, 0xe000) => !in_pixels,
            (0xfffe, _) => true,
            _ => is_sequence,
        };
        if !descend {
            if in_meta && (group, element) == (0x0002, 0x0010) && len <= 64 {
                let mut text = vec![0u8; len as usize];
                r.read_exact(&mut text).map_err(|_| "truncated transfer syntax".to_string())?;
                syntax = String::from_utf8_lossy(&text).into_owned();
            } else {
                r.seek_relative(len as i64).map_err(|e| format!("cannot read: {e}"))?;
            }
            pos += len as u64;
        }
    }
}

fn read_header(path: &Path) -> std::result::Result<Header, String> {
    if let Err(reason) = check_element_lengths(path) {
        return Ok(Header::NotASlice(format!("not a readable DICOM file: {reason}")));
    }
    let obj = OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(path).map_err(|e| e.to_string());
    let obj = match obj {
        Ok(obj) => obj,
        Err(e) => return Ok(Header::NotASlice(format!("not a readable DICOM file: {e}"))),
    };
    let meta = obj.meta();
    let clean = |s: &str| s.trim_end_matches(['\0', ' ']).to_string();
    let sop_class_uid = Some(text(&obj, tags::SOP_CLASS_UID))
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| clean(meta.media_storage_sop_class_uid()));
    let frames = int(&obj, tags::NUMBER_OF_FRAMES).unwrap_or(1);
    let position = floats(&obj, tags::IMAGE_POSITION_PATIENT);
    let rows = int(&obj, tags::ROWS);
    let columns = int(&obj, tags::COLUMNS);
    if frames > 1 {
        return Ok(Header::NotASlice(format!(
            "a multi-frame object ({frames} frames, SOP class {sop_class_uid}); prosam reads single-frame slice series"
        )));
    }
    let (Some(position), Some(rows), Some(columns)) = (position, rows, columns) else {
        return Ok(Header::NotASlice(format!(
            "not an image slice (SOP class {sop_class_uid}, modality {}): no ImagePositionPatient or image size",
            text(&obj, tags::MODALITY)
        )));
    };
    let field = |name: &str, v: Option<Vec<f64>>, n: usize| -> std::result::Result<Vec<f64>, String> {
        match v {
            Some(v) if v.len() == n && v.iter().all(|x| x.is_finite()) => Ok(v),
            Some(v) => Err(format!("{name} has {} values {v:?}, expected {n} finite numbers", v.len())),
            None => Err(format!("{name} is missing")),
        }
    };
    let position = field("ImagePositionPatient", Some(position), 3)?;
    let orientation = field("ImageOrientationPatient", floats(&obj, tags::IMAGE_ORIENTATION_PATIENT), 6)?;
    let pixel_spacing = field("PixelSpacing", floats(&obj, tags::PIXEL_SPACING), 2)?;
    if rows <= 0 || columns <= 0 {
        return Err(format!("the image is {rows} x {columns} pixels"));
    }
    if pixel_spacing.iter().any(|&s| s <= 0.0) {
        return Err(format!("PixelSpacing {pixel_spacing:?} is not positive"));
    }
    let slope = floats(&obj, tags::RESCALE_SLOPE).and_then(|v| v.first().copied()).unwrap_or(1.0);
    let intercept = floats(&obj, tags::RESCALE_INTERCEPT).and_then(|v| v.first().copied()).unwrap_or(0.0);
    if !(slope.is_finite() && slope != 0.0 && intercept.is_finite()) {
        return Err(format!("RescaleSlope {slope} / RescaleIntercept {intercept} cannot map pixels to HU"));
    }
    let slice = Slice {
        path: path.to_path_buf(),
        sop_instance_uid: Some(text(&obj, tags::SOP_INSTANCE_UID))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| clean(meta.media_storage_sop_instance_uid())),
        sop_class_uid,
        modality: text(&obj, tags::MODALITY),
        transfer_syntax: clean(meta.transfer_syntax()),
        instance_number: int(&obj, tags::INSTANCE_NUMBER),
        rows: rows as usize,
        columns: columns as usize,
        position: [position[0], position[1], position[2]],
        orientation: std::array::from_fn(|i| orientation[i]),
        pixel_spacing: [pixel_spacing[0], pixel_spacing[1]],
        slope,
        intercept,
        samples_per_pixel: int(&obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1) as u16,
        photometric: text(&obj, tags::PHOTOMETRIC_INTERPRETATION),
    };
    let key = SeriesKey {
        uid: text(&obj, tags::SERIES_INSTANCE_UID),
        number: int(&obj, tags::SERIES_NUMBER),
        description: text(&obj, tags::SERIES_DESCRIPTION),
        frame_of_reference_uid: text(&obj, tags::FRAME_OF_REFERENCE_UID),
        study: StudyInfo {
            patient_name: text(&obj, tags::PATIENT_NAME),
            patient_id: text(&obj, tags::PATIENT_ID),
            patient_birth_date: text(&obj, tags::PATIENT_BIRTH_DATE),
            patient_sex: text(&obj, tags::PATIENT_SEX),
            study_instance_uid: text(&obj, tags::STUDY_INSTANCE_UID),
            study_date: text(&obj, tags::STUDY_DATE),
            study_time: text(&obj, tags::STUDY_TIME),
            study_id: text(&obj, tags::STUDY_ID),
            accession_number: text(&obj, tags::ACCESSION_NUMBER),
            referring_physician_name: text(&obj, tags::REFERRING_PHYSICIAN_NAME),
        },
    };
    Ok(Header::Slice(Box::new((slice, key))))
}

fn files_under(folder: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(folder).map_err(|source| Error::Io { path: folder.to_path_buf(), source })?;
    for entry in entries {
        let entry = entry.map_err(|source| Error::Io { path: folder.to_path_buf(), source })?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|source| Error::Io { path: path.clone(), source })?;
        if kind.is_dir() {
            files_under(&path, out)?;
        } else if kind.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads the header of every file under `folder` (recursively) and groups the image slices by
/// series. Files that are not DICOM, or not single-frame image slices, are listed as ignored.
pub fn scan(folder: &Path) -> Result<Scan> {
    if !folder.is_dir() {
        return Err(bad(folder, "no such folder"));
    }
    let mut files = Vec::new();
    files_under(folder, &mut files)?;
    files.sort();
    let headers: Vec<_> = files.par_iter().map(|p| read_header(p)).collect();
    let mut series: Vec<Series> = Vec::new();
    let mut ignored = Vec::new();
    for (path, header) in files.iter().zip(headers) {
        match header {
            Ok(Header::Slice(found)) => {
                let (slice, key) = *found;
                // Blank UIDs (anonymised files) group by the series attributes that remain.
                let same = |s: &Series| {
                    s.uid == key.uid
                        && (!key.uid.is_empty()
                            || (s.number == key.number
                                && s.description == key.description
                                && s.frame_of_reference_uid == key.frame_of_reference_uid))
                };
                match series.iter_mut().find(|s| same(s)) {
                    Some(s) => s.slices.push(slice),
                    None => series.push(Series {
                        uid: key.uid,
                        number: key.number,
                        description: key.description,
                        modality: slice.modality.clone(),
                        frame_of_reference_uid: key.frame_of_reference_uid,
                        study: key.study,
                        slices: vec![slice],
                    }),
                }
            }
            Ok(Header::NotASlice(reason)) => ignored.push(Ignored { path: path.clone(), reason }),
            Err(reason) => return Err(bad(path, reason)),
        }
    }
    Ok(Scan { folder: folder.to_path_buf(), series, ignored })
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]]
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

/// A transfer syntax's name, and whether this build decodes its pixel data.
pub fn transfer_syntax(uid: &str) -> (String, bool) {
    use dicom_transfer_syntax_registry::TransferSyntaxIndex;
    match dicom_transfer_syntax_registry::TransferSyntaxRegistry.get(uid) {
        Some(ts) => (ts.name().to_string(), !(ts.is_unsupported() || ts.is_unsupported_pixel_encapsulation())),
        None => (format!("unknown transfer syntax {uid}"), false),
    }
}

/// The anatomical plane of an ImageOrientationPatient: the axis its normal follows.
pub fn plane(orientation: &[f64; 6]) -> &'static str {
    let o = orientation;
    let n = cross([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
    let (axis, largest) = (0..3).map(|a| (a, n[a].abs())).max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or((2, 1.0));
    if largest < 0.999 { "oblique" } else { ["sagittal", "coronal", "axial"][axis] }
}

fn name(p: &Path) -> String {
    p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
}

impl Series {
    /// A one-line name for listings: the UID, or a note that it is blank, with number and
    /// description.
    pub fn label(&self) -> String {
        let uid = if self.uid.is_empty() { "(blank SeriesInstanceUID)".to_string() } else { self.uid.clone() };
        let number = self.number.map(|n| format!(" #{n}")).unwrap_or_default();
        let description =
            if self.description.is_empty() { String::new() } else { format!(" \"{}\"", self.description) };
        format!("{uid}{number}{description}: {} {} slice(s)", self.slices.len(), self.modality)
    }

    /// The geometry of the series as one volume, or every reason it is not one (each naming the
    /// files or positions involved).
    pub fn geometry(&self) -> std::result::Result<Geometry, Vec<String>> {
        let mut problems = Vec::new();
        let first = &self.slices[0];
        for s in &self.slices {
            let (syntax, decodable) = transfer_syntax(&s.transfer_syntax);
            if !decodable {
                problems.push(format!("{}: this build cannot decode {syntax} ({})", name(&s.path), s.transfer_syntax));
            }
            if s.modality != "CT" {
                problems.push(format!("{} has modality {:?}; prosam segments CT", name(&s.path), s.modality));
            }
            if s.samples_per_pixel != 1 || !s.photometric.starts_with("MONOCHROME") {
                problems.push(format!(
                    "{} is not a grey-scale image ({} samples per pixel, {})",
                    name(&s.path),
                    s.samples_per_pixel,
                    s.photometric
                ));
            }
            if (s.rows, s.columns) != (first.rows, first.columns) {
                problems.push(format!(
                    "{} is {} x {} pixels where {} is {} x {}",
                    name(&s.path),
                    s.rows,
                    s.columns,
                    name(&first.path),
                    first.rows,
                    first.columns
                ));
            }
            if (0..2).any(|a| (s.pixel_spacing[a] - first.pixel_spacing[a]).abs() > 1e-4 * first.pixel_spacing[a]) {
                problems.push(format!(
                    "{} has PixelSpacing {:?} where {} has {:?}",
                    name(&s.path),
                    s.pixel_spacing,
                    name(&first.path),
                    first.pixel_spacing
                ));
            }
            if (0..6).any(|a| (s.orientation[a] - first.orientation[a]).abs() > ORIENTATION_TOLERANCE) {
                problems.push(format!(
                    "{} has ImageOrientationPatient {:?} where {} has {:?}",
                    name(&s.path),
                    s.orientation,
                    name(&first.path),
                    first.orientation
                ));
            }
        }
        let o = first.orientation;
        let (row_dir, col_dir) = ([o[0], o[1], o[2]], [o[3], o[4], o[5]]);
        let unit = |v: [f64; 3]| (dot(v, v).sqrt() - 1.0).abs() < GEOMETRY_TOLERANCE;
        if !unit(row_dir) || !unit(col_dir) || dot(row_dir, col_dir).abs() > GEOMETRY_TOLERANCE {
            problems.push(format!("ImageOrientationPatient {o:?} is not two orthogonal unit vectors"));
        }
        if self.slices.len() < 2 {
            problems.push("the series has one slice; a volume needs at least two".to_string());
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let normal = cross(row_dir, col_dir);
        let mut order: Vec<usize> = (0..self.slices.len()).collect();
        let along = |i: usize| dot(self.slices[i].position, normal);
        order.sort_by(|&a, &b| along(a).total_cmp(&along(b)));
        let steps: Vec<f64> = order.windows(2).map(|w| along(w[1]) - along(w[0])).collect();
        for (w, &d) in order.windows(2).zip(&steps) {
            if d.abs() < 1e-3 {
                let (a, b) = (&self.slices[w[0]], &self.slices[w[1]]);
                problems.push(format!(
                    "{} and {} lie at the same position {:?} (duplicate slices)",
                    name(&a.path),
                    name(&b.path),
                    a.position
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let mut sorted = steps.clone();
        sorted.sort_by(f64::total_cmp);
        let step = sorted[sorted.len() / 2];
        for (w, &d) in order.windows(2).zip(&steps) {
            if (d - step).abs() <= GEOMETRY_TOLERANCE * step {
                continue;
            }
            let (a, b) = (&self.slices[w[0]], &self.slices[w[1]]);
            let multiple = (d / step).round();
            if multiple >= 2.0 && (d - multiple * step).abs() <= GEOMETRY_TOLERANCE * step * multiple {
                problems.push(format!(
                    "{} slice(s) missing between {} at {:.3} mm and {} at {:.3} mm along the slice normal \
                     (a {d:.3} mm gap where the slices are {step:.3} mm apart)",
                    multiple as usize - 1,
                    name(&a.path),
                    along(w[0]),
                    name(&b.path),
                    along(w[1]),
                ));
            } else {
                problems.push(format!(
                    "the slice spacing varies: {d:.3} mm between {} at {:.3} mm and {} at {:.3} mm, {step:.3} mm \
                     elsewhere; prosam does not resample irregular stacks",
                    name(&a.path),
                    along(w[0]),
                    name(&b.path),
                    along(w[1]),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let (p0, p1) = (self.slices[order[0]].position, self.slices[*order.last().unwrap()].position);
        let n = (order.len() - 1) as f64;
        let step_vec = sub(p1, p0).map(|v| v / n);
        let tilt = (dot(step_vec, normal) / dot(step_vec, step_vec).sqrt()).clamp(-1.0, 1.0).acos().to_degrees();
        if tilt > MAX_TILT_DEGREES {
            problems.push(format!(
                "the slices are sheared by {tilt:.2} degrees (gantry tilt, or ImageOrientationPatient that does not \
                 match the slice positions): the stack is not a rectangular grid, and prosam does not resample it"
            ));
            return Err(problems);
        }

        let [row_spacing, col_spacing] = first.pixel_spacing;
        let rows = first.rows as f64;
        // LPS columns: i along a row, j against the stored rows, k through the sorted slices.
        let col_i = row_dir.map(|v| v * col_spacing);
        let col_j = col_dir.map(|v| -v * row_spacing);
        let origin = [0, 1, 2].map(|a| p0[a] + col_dir[a] * row_spacing * (rows - 1.0));
        let lps = Affine::from_rows([0, 1, 2].map(|r| [col_i[r], col_j[r], step_vec[r], origin[r]]));
        Ok(Geometry {
            dims: [first.columns, first.rows, order.len()],
            affine: lps.lps_to_ras(),
            spacing: [col_spacing, row_spacing, dot(step_vec, step_vec).sqrt()],
            order,
        })
    }
}

impl Scan {
    /// The series to segment: the one named by `select` (a SeriesInstanceUID, or its number in
    /// the listing, from 1), else the only one. Several without a choice is an error listing them.
    pub fn select(&self, select: Option<&str>) -> Result<&Series> {
        let listing =
            || self.series.iter().enumerate().map(|(i, s)| format!("\n  {}. {}", i + 1, s.label())).collect::<String>();
        if self.series.is_empty() {
            let why = self
                .ignored
                .first()
                .map(|i| format!(" ({} ignored file(s); e.g. {}: {})", self.ignored.len(), name(&i.path), i.reason))
                .unwrap_or_default();
            return Err(bad(&self.folder, format!("no DICOM image series found{why}")));
        }
        match select {
            Some(choice) => {
                let by_number =
                    choice.parse::<usize>().ok().and_then(|n| n.checked_sub(1)).and_then(|i| self.series.get(i));
                by_number.or_else(|| self.series.iter().find(|s| !s.uid.is_empty() && s.uid == choice)).ok_or_else(
                    || bad(&self.folder, format!("no series {choice:?} here; the folder holds:{}", listing())),
                )
            }
            None if self.series.len() == 1 => Ok(&self.series[0]),
            None => Err(bad(
                &self.folder,
                format!(
                    "holds {} image series; choose one with --series UID (or its number):{}",
                    self.series.len(),
                    listing()
                ),
            )),
        }
    }
}

/// Decodes one slice's pixels as stored values (no modality LUT), maps them to HU with its own
/// slope and intercept, and writes them into `out` (`columns x rows`, rows bottom to top).
fn decode_slice(slice: &Slice, out: &mut [f32]) -> std::result::Result<(), String> {
    let obj = dicom_object::open_file(&slice.path).map_err(|e| format!("cannot read: {e}"))?;
    if let Ok(element) = obj.element(tags::PIXEL_DATA)
        && let Some(fragments) = element.value().fragments()
    {
        let first = fragments.iter().find(|f| !f.is_empty()).map_or(&[][..], |f| f.as_slice());
        check_codestream(first, slice)?;
    }
    // The decoders are third-party code that can panic on corrupt data (dicom-rs 0.10's RLE
    // decoder unwraps a short segment); a bad file must be an error, not a crash.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obj.decode_pixel_data()))
        .map_err(|_| format!("the pixel data is corrupt (its {} decoder failed)", slice.transfer_syntax))?
        .map_err(|e| format!("cannot decode the pixel data (transfer syntax {}): {e}", slice.transfer_syntax))?;
    if (decoded.rows() as usize, decoded.columns() as usize) != (slice.rows, slice.columns) {
        return Err(format!(
            "the pixel data is {} x {}, the header says {} x {}",
            decoded.rows(),
            decoded.columns(),
            slice.rows,
            slice.columns
        ));
    }
    let options = ConvertOptions::new().with_modality_lut(ModalityLutOption::None);
    let raw: Vec<f64> =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decoded.to_vec_with_options(&options)))
            .map_err(|_| "the pixel data is corrupt (its conversion failed)".to_string())?
            .map_err(|e| format!("cannot convert the pixel data: {e}"))?;
    let (nx, ny) = (slice.columns, slice.rows);
    if raw.len() != nx * ny {
        return Err(format!("{} pixel values for a {} x {} image", raw.len(), slice.rows, slice.columns));
    }
    for j in 0..ny {
        let row = &raw[(ny - 1 - j) * nx..(ny - j) * nx];
        for (o, &v) in out[j * nx..(j + 1) * nx].iter_mut().zip(row) {
            *o = (v * slice.slope + slice.intercept) as f32;
        }
    }
    Ok(())
}

/// More JPEG 2000 tiles than this in one frame is refused (CT encoders write one).
const MAX_J2K_TILES: u64 = 4096;

/// The image size a compressed frame declares for itself (JPEG 2000's SIZ marker, JPEG's SOF),
/// checked against the header's before a decoder allocates by it: the memory budget admitted
/// the header's size, and a codestream claiming 60000 x 60000 pixels must not be decoded.
fn check_codestream(frame: &[u8], slice: &Slice) -> std::result::Result<(), String> {
    let be16 = |at: usize| frame.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]) as u64);
    let be32 = |at: usize| frame.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as u64);
    let declared = if let Some(siz) = frame.windows(4).take(4096).position(|w| w == [0xff, 0x4f, 0xff, 0x51]) {
        // SOC, SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz ... Csiz.
        let at = siz + 4;
        let field = |offset: usize| be32(at + offset).ok_or("a truncated JPEG 2000 codestream header");
        let (x, y, xo, yo) = (field(4)?, field(8)?, field(12)?, field(16)?);
        let (tx, ty, txo, tyo) = (field(20)?, field(24)?, field(28)?, field(32)?);
        let c = be16(at + 36).ok_or("a truncated JPEG 2000 codestream header")?;
        // Each tile costs the decoder its own buffers: real images use one, or a few.
        let tiles = |size: u64, origin: u64, tile: u64| size.saturating_sub(origin).div_ceil(tile.max(1));
        if tx == 0 || ty == 0 || tiles(x, txo, tx).saturating_mul(tiles(y, tyo, ty)) > MAX_J2K_TILES {
            return Err(format!("the JPEG 2000 codestream cuts its image into {tx} x {ty} pixel tiles"));
        }
        Some((x.saturating_sub(xo), y.saturating_sub(yo), c))
    } else if frame.starts_with(&[0xff, 0xd8]) {
        // JPEG: walk the markers to the first start-of-frame (SOF0-15 but DHT, JPG, DAC; JPEG-LS SOF55).
        let mut at = 2;
        let mut found = None;
        while let (Some(&0xff), Some(&marker)) = (frame.get(at), frame.get(at + 1)) {
            if marker == 0xff {
                at += 1;
                continue;
            }
            let len = be16(at + 2).ok_or("a truncated JPEG header")? as usize;
            let sof = matches!(marker, 0xc0..=0xcf) && !matches!(marker, 0xc4 | 0xc8 | 0xcc) || marker == 0xf7;
            if sof {
                let (y, x, c) = (be16(at + 5), be16(at + 7), frame.get(at + 9).map(|&c| c as u64));
                let (Some(y), Some(x), Some(c)) = (y, x, c) else { return Err("a truncated JPEG frame header".into()) };
                found = Some((x, y, c));
                break;
            }
            at += 2 + len;
        }
        found
    } else {
        None
    };
    match declared {
        Some((x, y, c))
            if (x, y) != (slice.columns as u64, slice.rows as u64) || c != slice.samples_per_pixel.max(1) as u64 =>
        {
            Err(format!(
                "the compressed pixel data declares {x} x {y} pixels of {c} sample(s), the header {} x {} of {}",
                slice.columns,
                slice.rows,
                slice.samples_per_pixel.max(1)
            ))
        }
        _ => Ok(()),
    }
}

/// Bytes one slice decode holds at its peak besides its float32 output: the file's elements, the
/// decoded samples (up to 32-bit) and their float64 copy.
fn slice_decode_bytes(slice: &Slice) -> u64 {
    let pixels = (slice.rows as u64) * (slice.columns as u64) * slice.samples_per_pixel.max(1) as u64;
    let file = std::fs::metadata(&slice.path).map_or(0, |m| m.len());
    file + pixels * (4 + 8)
}

impl Slice {
    /// This slice's pixels in HU (`columns x rows`, rows bottom to top), decoded on their own
    /// once `budget` admits the decode.
    pub fn pixels_hu(&self, budget: MemoryBudget) -> Result<Vec<f32>> {
        let need = slice_decode_bytes(self) + 4 * (self.rows * self.columns) as u64;
        budget.check(need, || format!("{}: decoding a {} x {} slice", self.path.display(), self.columns, self.rows))?;
        // A Slice can be built by hand, so this entry point does not rely on `scan`'s walk.
        check_element_lengths(&self.path).map_err(|e| bad(&self.path, e))?;
        let mut out = vec![0f32; self.rows * self.columns];
        decode_slice(self, &mut out).map_err(|e| bad(&self.path, e))?;
        Ok(out)
    }
}

/// Reads a series to a volume in HU, after checking that it is one (see [`Series::geometry`]),
/// within the machine's memory.
pub fn read_series(folder: &Path, series: &Series) -> Result<DicomInput> {
    read_series_admitting(folder, series, &memory::admit_read(MemoryBudget::effective()))
}

/// As [`read_series`], asking `admit` before any pixel data is read or decoded.
pub fn read_series_admitting(folder: &Path, series: &Series, admit: Admit) -> Result<DicomInput> {
    let geometry = series.geometry().map_err(|problems| {
        bad(folder, format!("series {} cannot be read as one volume: {}", series.label(), problems.join("; ")))
    })?;
    let [nx, ny, nz] = geometry.dims;
    let voxels = (nx as u64).saturating_mul(ny as u64).saturating_mul(nz as u64);
    let in_flight = rayon::current_num_threads().min(nz) as u64;
    let per_slice = series.slices.iter().map(slice_decode_bytes).max().unwrap_or(0);
    let read_bytes = memory::bytes_of(voxels, 4).saturating_add(in_flight.saturating_mul(per_slice));
    admit(&VolumeShape { dims: geometry.dims, affine: geometry.affine, read_bytes })?;
    let mut data = Vec::new();
    data.try_reserve_exact(nx * ny * nz).map_err(|_| {
        bad(folder, format!("cannot allocate {} for the series", memory::format_bytes(memory::bytes_of(voxels, 4))))
    })?;
    data.resize(nx * ny * nz, 0f32);
    data.par_chunks_mut(nx * ny)
        .zip(geometry.order.par_iter())
        .try_for_each(|(out, &i)| decode_slice(&series.slices[i], out).map_err(|e| bad(&series.slices[i].path, e)))?;
    let volume = Volume { dims: geometry.dims, data, affine: geometry.affine };
    if let Some(bad_values) = volume.non_finite() {
        let file = &series.slices[geometry.order[bad_values.first[2]]].path;
        return Err(bad(folder, format!("{bad_values} (in {})", file.display())));
    }
    Ok(DicomInput { volume, series: series.clone(), geometry })
}

/// Finds the series in `folder` ([`Scan::select`]) and reads it.
pub fn read(folder: &Path, select: Option<&str>) -> Result<DicomInput> {
    read_admitting(folder, select, &memory::admit_read(MemoryBudget::effective()))
}

/// As [`read`], asking `admit` before any pixel data is read or decoded.
pub fn read_admitting(folder: &Path, select: Option<&str>, admit: Admit) -> Result<DicomInput> {
    let scan = scan(folder)?;
    let series = scan.select(select)?;
    read_series_admitting(folder, series, admit)
}
