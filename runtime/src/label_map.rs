//! Label renumbering from a JSON object `{"source": target}`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Error, Result};

/// A renumbering of label values (`{"5": 6, "1": 1, ...}`, source to target); values it does not
/// list become background. The TotalSegmentator -> BTCV map of `../shared/data/README.md` is one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    map: BTreeMap<u8, u8>,
}

impl LabelMap {
    pub fn load(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::LabelMap { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        let obj = json.as_object().ok_or_else(|| bad("expected an object of source label -> target label".into()))?;
        let mut map = BTreeMap::new();
        for (k, v) in obj {
            let from = k.parse::<u8>().map_err(|_| bad(format!("source label `{k}` is not a number in 0..=255")))?;
            let to = v
                .as_u64()
                .filter(|&t| t <= 255)
                .ok_or_else(|| bad(format!("target of label {k} is not a number in 0..=255")))?;
            map.insert(from, to as u8);
        }
        Ok(Self { map })
    }

    pub fn new(map: BTreeMap<u8, u8>) -> Self {
        Self { map }
    }

    pub fn apply(&self, label: u8) -> u8 {
        self.map.get(&label).copied().unwrap_or(0)
    }

    /// A stable description, for cache keys.
    pub fn key(&self) -> String {
        format!("{:?}", self.map)
    }
}
