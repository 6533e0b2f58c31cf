//! DICOM-SEG output: a binary Segmentation object for a label map on a DICOM series' grid.
//!
//! One segment per label present, coded with SNOMED CT (the BTCV organs); one frame per
//! (segment, slice) where the segment has voxels, each referencing its source image; the series and
//! every source image listed in the Common Instance Reference module; the algorithm (prosam
//! version, model name and checksum) in each segment's algorithm identification.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use dicom_core::smallvec::SmallVec;
use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Tag, VR};
use dicom_dictionary_std::{tags, uids};
use dicom_object::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;
use sha2::{Digest, Sha256};

use super::dicom::DicomInput;
use crate::{Error, Result};

/// A coded concept: (code value, coding scheme, meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code(pub &'static str, pub &'static str, pub &'static str);

const ANATOMICAL_STRUCTURE: Code = Code("123037004", "SCT", "Anatomical Structure");
const TISSUE: Code = Code("85756007", "SCT", "Tissue");

/// The SNOMED CT concept of an organ named as prosam's label maps name them (BTCV and
/// TotalSegmentator spellings), or `None` for a name it does not know.
pub fn organ_code(name: &str) -> Option<Code> {
    Some(match name {
        "spleen" => Code("78961009", "SCT", "Spleen"),
        "right_kidney" | "kidney_right" => Code("9846003", "SCT", "Right kidney"),
        "left_kidney" | "kidney_left" => Code("18639004", "SCT", "Left kidney"),
        "gallbladder" => Code("28231008", "SCT", "Gallbladder"),
        "esophagus" => Code("32849002", "SCT", "Esophagus"),
        "liver" => Code("10200004", "SCT", "Liver"),
        "stomach" => Code("69695003", "SCT", "Stomach"),
        "aorta" => Code("15825003", "SCT", "Aorta"),
        "inferior_vena_cava" => Code("64131007", "SCT", "Inferior vena cava"),
        // SNOMED CT has no concept for the two veins together; the portal vein is the main one.
        "portal_and_splenic_vein" | "portal_vein_and_splenic_vein" => Code("32764006", "SCT", "Portal vein"),
        "pancreas" => Code("15776009", "SCT", "Pancreas"),
        "right_adrenal_gland" | "adrenal_gland_right" => Code("281625004", "SCT", "Right adrenal gland"),
        "left_adrenal_gland" | "adrenal_gland_left" => Code("281624000", "SCT", "Left adrenal gland"),
        _ => return None,
    })
}

/// Who made the segmentation, for the algorithm identification.
#[derive(Debug, Clone)]
pub struct Algorithm {
    pub model_name: String,
    pub model_checksum: String,
    pub prosam_version: String,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SegSummary {
    pub sop_instance_uid: String,
    pub segments: usize,
    pub frames: usize,
    pub referenced_instances: usize,
    /// Source attributes that were blank and what was done about them.
    pub notes: Vec<String>,
}

/// A fresh UID under the UUID-derived root 2.25 (ISO/IEC 9834-8): 128 bits from a hash of the
/// time, the process and a counter, so two calls never repeat.
fn new_uid(seed: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let digest = Sha256::digest(format!("{seed}/{nanos}/{}/{n}", std::process::id()));
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    format!("2.25.{}", u128::from_be_bytes(bytes))
}

/// UTC date (YYYYMMDD) and time (HHMMSS) now.
fn date_time_now() -> (String, String) {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (format!("{year:04}{month:02}{day:02}"), format!("{:02}{:02}{:02}", rem / 3600, rem / 60 % 60, rem % 60))
}

/// A decimal string (DS) of at most 16 characters.
fn ds(v: f64) -> String {
    for precision in (0..=10).rev() {
        let s = format!("{v:.precision$}");
        let s = if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s };
        if s.len() <= 16 {
            return if s == "-0" { "0".into() } else { s };
        }
    }
    format!("{v:.6e}")
}

fn strs(values: impl IntoIterator<Item = String>) -> PrimitiveValue {
    PrimitiveValue::Strs(values.into_iter().collect::<SmallVec<_>>())
}

fn el(tag: Tag, vr: VR, value: impl Into<PrimitiveValue>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, value.into())
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::from(items))
}

fn item(elements: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elements)
}

fn code_item(code: Code) -> InMemDicomObject {
    item(vec![
        el(tags::CODE_VALUE, VR::SH, code.0),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, code.1),
        el(tags::CODE_MEANING, VR::LO, code.2),
    ])
}

/// Writes the Segmentation object for `labels` (the volume layout of [`DicomInput`], `dims` its
/// grid) to `path` through a temporary file. Labels with no voxel get no segment; `names[l]` names
/// label `l`.
pub fn write(
    path: &Path,
    input: &DicomInput,
    labels: &[u8],
    names: &[String],
    algorithm: &Algorithm,
) -> Result<SegSummary> {
    let [nx, ny, nz] = input.geometry.dims;
    let fail = |reason: String| Error::Dicom { path: path.to_path_buf(), reason };
    if labels.len() != nx * ny * nz {
        return Err(fail(format!("{} labels for a {nx} x {ny} x {nz} series", labels.len())));
    }
    let series = &input.series;
    let slices: Vec<_> = input.geometry.order.iter().map(|&i| &series.slices[i]).collect();
    let mut notes = Vec::new();

    // Segments: the labels present, in label order.
    let mut present = [false; 256];
    labels.iter().for_each(|&l| present[l as usize] = true);
    let segment_labels: Vec<u8> = (1..=255u8).filter(|&l| present[l as usize]).collect();
    let label_name = |l: u8| names.get(l as usize).cloned().unwrap_or_else(|| format!("label_{l}"));

    // Frames: (segment, slice) pairs with voxels, segment-major, slices in volume order.
    let frame_pixels = nx * ny;
    let mut frames: Vec<(usize, usize)> = Vec::new();
    for (s, &l) in segment_labels.iter().enumerate() {
        for k in 0..nz {
            if labels[k * frame_pixels..(k + 1) * frame_pixels].contains(&l) {
                frames.push((s, k));
            }
        }
    }
    // Frame pixels are in the source image's order (rows top to bottom), bits packed LSB first,
    // frames back to back, the whole padded to an even length.
    let total_bits = frames.len() * frame_pixels;
    let mut pixel_data = vec![0u8; total_bits.div_ceil(8).next_multiple_of(2)];
    for (f, &(s, k)) in frames.iter().enumerate() {
        let label = segment_labels[s];
        for r in 0..ny {
            let j = ny - 1 - r;
            let row = &labels[(k * ny + j) * nx..(k * ny + j + 1) * nx];
            for (c, &v) in row.iter().enumerate() {
                if v == label {
                    let bit = f * frame_pixels + r * nx + c;
                    pixel_data[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
    }

    let (date, time) = date_time_now();
    let sop_instance_uid = new_uid(&algorithm.model_checksum);
    let study_uid = if series.study.study_instance_uid.is_empty() {
        notes.push("the source has no StudyInstanceUID; the SEG got a new one".into());
        new_uid("study")
    } else {
        series.study.study_instance_uid.clone()
    };
    let frame_of_reference = if series.frame_of_reference_uid.is_empty() {
        notes.push("the source has no FrameOfReferenceUID; the SEG got a new one".into());
        new_uid("frame-of-reference")
    } else {
        series.frame_of_reference_uid.clone()
    };
    if series.uid.is_empty() {
        notes.push(
            "the source has no SeriesInstanceUID; the series reference is blank (each source image is still \
             referenced by its SOP Instance UID)"
                .into(),
        );
    }
    let dimension_uid = new_uid("dimension-organization");
    let orientation = strs(slices[0].orientation.iter().map(|&v| ds(v)));
    let [col_spacing, row_spacing, slice_spacing] = input.geometry.spacing;

    let segments: Vec<InMemDicomObject> = segment_labels
        .iter()
        .enumerate()
        .map(|(s, &l)| {
            let name = label_name(l);
            let code = organ_code(&name).unwrap_or(TISSUE);
            item(vec![
                seq(tags::SEGMENTED_PROPERTY_CATEGORY_CODE_SEQUENCE, vec![code_item(ANATOMICAL_STRUCTURE)]),
                el(tags::SEGMENT_NUMBER, VR::US, (s + 1) as u16),
                el(tags::SEGMENT_LABEL, VR::LO, name.as_str()),
                el(tags::SEGMENT_DESCRIPTION, VR::ST, format!("label {l} of {}", algorithm.model_name).as_str()),
                el(tags::SEGMENT_ALGORITHM_TYPE, VR::CS, "AUTOMATIC"),
                el(tags::SEGMENT_ALGORITHM_NAME, VR::LO, algorithm.model_name.as_str()),
                seq(
                    tags::SEGMENTATION_ALGORITHM_IDENTIFICATION_SEQUENCE,
                    vec![item(vec![
                        seq(
                            tags::ALGORITHM_FAMILY_CODE_SEQUENCE,
                            vec![code_item(Code("123110", "DCM", "Artificial Intelligence"))],
                        ),
                        el(tags::ALGORITHM_NAME, VR::LO, algorithm.model_name.as_str()),
                        el(tags::ALGORITHM_VERSION, VR::LO, format!("prosam {}", algorithm.prosam_version).as_str()),
                        el(
                            tags::ALGORITHM_PARAMETERS,
                            VR::LT,
                            format!("model_checksum={}", algorithm.model_checksum).as_str(),
                        ),
                    ])],
                ),
                seq(tags::SEGMENTED_PROPERTY_TYPE_CODE_SEQUENCE, vec![code_item(code)]),
            ])
        })
        .collect();

    let source_item = |k: usize| {
        item(vec![
            el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, slices[k].sop_class_uid.as_str()),
            el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, slices[k].sop_instance_uid.as_str()),
        ])
    };
    let per_frame: Vec<InMemDicomObject> = frames
        .iter()
        .map(|&(s, k)| {
            let mut source = source_item(k);
            source.put(seq(
                tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE,
                vec![code_item(Code("121322", "DCM", "Source image for image processing operation"))],
            ));
            item(vec![
                seq(
                    tags::DERIVATION_IMAGE_SEQUENCE,
                    vec![item(vec![
                        seq(tags::DERIVATION_CODE_SEQUENCE, vec![code_item(Code("113076", "DCM", "Segmentation"))]),
                        seq(tags::SOURCE_IMAGE_SEQUENCE, vec![source]),
                    ])],
                ),
                seq(
                    tags::FRAME_CONTENT_SEQUENCE,
                    vec![item(vec![el(
                        tags::DIMENSION_INDEX_VALUES,
                        VR::UL,
                        PrimitiveValue::U32([(s + 1) as u32, (k + 1) as u32].into_iter().collect()),
                    )])],
                ),
                seq(
                    tags::PLANE_POSITION_SEQUENCE,
                    vec![item(vec![el(
                        tags::IMAGE_POSITION_PATIENT,
                        VR::DS,
                        strs(slices[k].position.iter().map(|&v| ds(v))),
                    )])],
                ),
                seq(
                    tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                    vec![item(vec![el(tags::REFERENCED_SEGMENT_NUMBER, VR::US, (s + 1) as u16)])],
                ),
            ])
        })
        .collect();
    let dimension = |pointer: Tag, group: Tag, label: &str| {
        item(vec![
            el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dimension_uid.as_str()),
            el(tags::DIMENSION_INDEX_POINTER, VR::AT, PrimitiveValue::Tags([pointer].into_iter().collect())),
            el(tags::FUNCTIONAL_GROUP_POINTER, VR::AT, PrimitiveValue::Tags([group].into_iter().collect())),
            el(tags::DIMENSION_DESCRIPTION_LABEL, VR::LO, label),
        ])
    };
    let study = &series.study;
    let software = format!("prosam {}", algorithm.prosam_version);
    let obj = InMemDicomObject::from_element_iter([
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 192"),
        el(tags::IMAGE_TYPE, VR::CS, strs(["DERIVED".to_string(), "PRIMARY".to_string()])),
        el(tags::SOP_CLASS_UID, VR::UI, uids::SEGMENTATION_STORAGE),
        el(tags::SOP_INSTANCE_UID, VR::UI, sop_instance_uid.as_str()),
        el(tags::STUDY_DATE, VR::DA, study.study_date.as_str()),
        el(tags::SERIES_DATE, VR::DA, date.as_str()),
        el(tags::CONTENT_DATE, VR::DA, date.as_str()),
        el(tags::STUDY_TIME, VR::TM, study.study_time.as_str()),
        el(tags::SERIES_TIME, VR::TM, time.as_str()),
        el(tags::CONTENT_TIME, VR::TM, time.as_str()),
        el(tags::ACCESSION_NUMBER, VR::SH, study.accession_number.as_str()),
        el(tags::MODALITY, VR::CS, "SEG"),
        el(tags::MANUFACTURER, VR::LO, "prosam"),
        el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, study.referring_physician_name.as_str()),
        el(tags::SERIES_DESCRIPTION, VR::LO, format!("prosam {} segmentation", algorithm.model_name).as_str()),
        el(tags::MANUFACTURER_MODEL_NAME, VR::LO, algorithm.model_name.as_str()),
        seq(
            tags::REFERENCED_SERIES_SEQUENCE,
            vec![item(vec![
                el(tags::SERIES_INSTANCE_UID, VR::UI, series.uid.as_str()),
                seq(tags::REFERENCED_INSTANCE_SEQUENCE, (0..nz).map(source_item).collect()),
            ])],
        ),
        el(tags::PATIENT_NAME, VR::PN, study.patient_name.as_str()),
        el(tags::PATIENT_ID, VR::LO, study.patient_id.as_str()),
        el(tags::PATIENT_BIRTH_DATE, VR::DA, study.patient_birth_date.as_str()),
        el(tags::PATIENT_SEX, VR::CS, study.patient_sex.as_str()),
        el(tags::DEVICE_SERIAL_NUMBER, VR::LO, "0"),
        el(tags::SOFTWARE_VERSIONS, VR::LO, software.as_str()),
        el(tags::STUDY_INSTANCE_UID, VR::UI, study_uid.as_str()),
        el(tags::SERIES_INSTANCE_UID, VR::UI, new_uid("series").as_str()),
        el(tags::STUDY_ID, VR::SH, study.study_id.as_str()),
        el(tags::SERIES_NUMBER, VR::IS, "99"),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(tags::FRAME_OF_REFERENCE_UID, VR::UI, frame_of_reference.as_str()),
        el(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
        seq(
            tags::DIMENSION_ORGANIZATION_SEQUENCE,
            vec![item(vec![el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dimension_uid.as_str())])],
        ),
        seq(
            tags::DIMENSION_INDEX_SEQUENCE,
            vec![
                dimension(
                    tags::REFERENCED_SEGMENT_NUMBER,
                    tags::SEGMENT_IDENTIFICATION_SEQUENCE,
                    "ReferencedSegmentNumber",
                ),
                dimension(tags::IMAGE_POSITION_PATIENT, tags::PLANE_POSITION_SEQUENCE, "ImagePositionPatient"),
            ],
        ),
        el(tags::SAMPLES_PER_PIXEL, VR::US, 1u16),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        el(tags::NUMBER_OF_FRAMES, VR::IS, frames.len().to_string().as_str()),
        el(tags::ROWS, VR::US, ny as u16),
        el(tags::COLUMNS, VR::US, nx as u16),
        el(tags::BITS_ALLOCATED, VR::US, 1u16),
        el(tags::BITS_STORED, VR::US, 1u16),
        el(tags::HIGH_BIT, VR::US, 0u16),
        el(tags::PIXEL_REPRESENTATION, VR::US, 0u16),
        el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        el(tags::SEGMENTATION_TYPE, VR::CS, "BINARY"),
        el(tags::CONTENT_LABEL, VR::CS, "ORGANS"),
        el(tags::CONTENT_DESCRIPTION, VR::LO, format!("organs segmented by {software}").as_str()),
        el(tags::CONTENT_CREATOR_NAME, VR::PN, "prosam"),
        seq(tags::SEGMENT_SEQUENCE, segments),
        seq(
            tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE,
            vec![item(vec![
                seq(
                    tags::PIXEL_MEASURES_SEQUENCE,
                    vec![item(vec![
                        el(tags::SLICE_THICKNESS, VR::DS, ds(slice_spacing).as_str()),
                        el(tags::SPACING_BETWEEN_SLICES, VR::DS, ds(slice_spacing).as_str()),
                        el(tags::PIXEL_SPACING, VR::DS, strs([ds(row_spacing), ds(col_spacing)])),
                    ])],
                ),
                seq(
                    tags::PLANE_ORIENTATION_SEQUENCE,
                    vec![item(vec![el(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, orientation)])],
                ),
            ])],
        ),
        seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame),
        el(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(pixel_data.into())),
    ]);
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN)
                .implementation_class_uid("2.25.311874290866317377547236398302735632917")
                .implementation_version_name(format!("PROSAM_{}", algorithm.prosam_version)),
        )
        .map_err(|e| fail(format!("cannot build the file meta group: {e}")))?;
    prosam_models::temp_file::write_via_temp(path, |tmp| file.write_to_file(tmp).map_err(std::io::Error::other))?;
    Ok(SegSummary {
        sop_instance_uid,
        segments: segment_labels.len(),
        frames: frames.len(),
        referenced_instances: nz,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_strings_fit_sixteen_characters() {
        assert_eq!(ds(-249.51171875), "-249.51171875");
        assert_eq!(ds(2.0), "2");
        assert_eq!(ds(-0.0), "0");
        assert_eq!(ds(0.1 + 0.2), "0.3");
        assert!(ds(-123456.123456789).len() <= 16);
        assert_eq!(ds(1.0 / 3.0).len(), 12);
    }

    #[test]
    fn dates_are_calendar_dates() {
        let (date, time) = date_time_now();
        assert_eq!((date.len(), time.len()), (8, 6));
        let year: i32 = date[..4].parse().unwrap();
        assert!((2024..2200).contains(&year));
        assert!((1..=12).contains(&date[4..6].parse::<u32>().unwrap()));
    }

    #[test]
    fn uids_are_fresh_and_valid() {
        let (a, b) = (new_uid("x"), new_uid("x"));
        assert_ne!(a, b);
        assert!(a.len() <= 64 && a.starts_with("2.25.") && a[5..].chars().all(|c| c.is_ascii_digit()));
    }
}
