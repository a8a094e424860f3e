//! `model.safetensors.index.json`: which file of a sharded checkpoint holds each tensor.
//! Parsed distrustfully, as headers are: the names must be plain file names in the folder,
//! and the map is bounded.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::format::safetensors::max_tensors;

/// A parsed index: tensor name → file name, and the distinct file names in sorted order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Index {
    pub weight_map: BTreeMap<String, String>,
    pub files: Vec<String>,
}

/// Parses the bytes of an index file. Errors say what is wrong (the caller adds the path).
pub fn parse_index(bytes: &[u8]) -> Result<Index, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let wm = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or("model.safetensors.index.json has no weight_map")?;
    let max = max_tensors();
    if wm.len() > max {
        return Err(format!(
            "the weight_map lists {} tensors, more than the {max} accepted (set SHARDMERGE_MAX_TENSORS to raise the limit)",
            wm.len()
        ));
    }
    let mut out = Index::default();
    for (tensor, file) in wm {
        let file = file
            .as_str()
            .ok_or_else(|| format!("weight_map values must be file names (tensor {tensor})"))?;
        if file.is_empty()
            || file.contains('/')
            || file.contains('\\')
            || file.contains("..")
            || file.contains('\0')
        {
            return Err(format!(
                "weight_map names a file outside the folder: {file:?} (tensor {tensor})"
            ));
        }
        out.weight_map.insert(tensor.clone(), file.to_string());
    }
    let mut files: Vec<String> = out.weight_map.values().cloned().collect();
    files.sort();
    files.dedup();
    out.files = files;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let i =
            parse_index(br#"{"metadata":{},"weight_map":{"a":"f2","b":"f1","c":"f2"}}"#).unwrap();
        assert_eq!(i.files, ["f1", "f2"]);
        assert_eq!(i.weight_map["a"], "f2");
        for (bad, want) in [
            (&b"{}"[..], "no weight_map"),
            (b"[", "not valid JSON"),
            (br#"{"weight_map":{"a":1}}"#, "file names"),
            (br#"{"weight_map":{"a":"../x"}}"#, "outside the folder"),
            (
                br#"{"weight_map":{"a":"/etc/passwd"}}"#,
                "outside the folder",
            ),
            (br#"{"weight_map":{"a":""}}"#, "outside the folder"),
        ] {
            let e = parse_index(bad).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
