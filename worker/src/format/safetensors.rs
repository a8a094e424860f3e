//! A small safetensors header parser that distrusts its input, and the header writer.
//!
//! A safetensors file is `u64 little-endian header length`, then that many bytes of JSON
//! (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {..}}`), then
//! the data. Offsets are relative to the end of the header. Everything here is checked before it
//! is believed: the header length is capped, shapes multiply without overflow, every tensor's
//! byte length matches its shape and dtype, and tensors lie inside the file without overlapping.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use crate::format::dtype::DType;

/// Largest header we accept (the reference implementation's cap as well).
pub(crate) const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;
/// Most dimensions a tensor may have.
pub(crate) const MAX_RANK: usize = 8;

/// Element type as written in the header. Only the float types can be merged; the others are
/// parsed so that a checkpoint carrying them can still be verified and reported clearly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StDtype {
    Float(DType),
    Other(&'static str, usize),
}

impl StDtype {
    pub fn parse(s: &str) -> Option<StDtype> {
        Some(match s {
            "F32" => StDtype::Float(DType::F32),
            "F16" => StDtype::Float(DType::F16),
            "BF16" => StDtype::Float(DType::BF16),
            "F64" => StDtype::Other("F64", 8),
            "I64" => StDtype::Other("I64", 8),
            "U64" => StDtype::Other("U64", 8),
            "I32" => StDtype::Other("I32", 4),
            "U32" => StDtype::Other("U32", 4),
            "I16" => StDtype::Other("I16", 2),
            "U16" => StDtype::Other("U16", 2),
            "I8" => StDtype::Other("I8", 1),
            "U8" => StDtype::Other("U8", 1),
            "BOOL" => StDtype::Other("BOOL", 1),
            "F8_E4M3" => StDtype::Other("F8_E4M3", 1),
            "F8_E5M2" => StDtype::Other("F8_E5M2", 1),
            _ => return None,
        })
    }

    pub fn size(self) -> usize {
        match self {
            StDtype::Float(d) => d.size(),
            StDtype::Other(_, s) => s,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StDtype::Float(d) => d.name(),
            StDtype::Other(n, _) => n,
        }
    }
}

/// One tensor's entry in a header. `start`/`end` are absolute file offsets.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub dtype: StDtype,
    pub shape: Vec<u64>,
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A parsed header. Tensors are kept in file order (by start offset).
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Bytes before the data: 8 + header length.
    pub data_start: u64,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderError(pub String);

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HeaderError {}

fn err<T>(msg: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError(msg.into()))
}

/// Reads the header length from the first 8 bytes and checks it against the file size.
pub fn header_len(prefix: &[u8], file_size: u64) -> Result<u64, HeaderError> {
    if file_size < 8 || prefix.len() < 8 {
        return err(format!(
            "file is {file_size} bytes, too short for a safetensors header (needs at least 8)"
        ));
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&prefix[..8]);
    let n = u64::from_le_bytes(b);
    if n > MAX_HEADER_LEN {
        return err(format!(
            "header length {n} is over the {MAX_HEADER_LEN}-byte limit (corrupt file or not safetensors)"
        ));
    }
    if n > file_size - 8 {
        return err(format!(
            "header length {n} runs past the end of the file ({file_size} bytes): truncated or corrupt"
        ));
    }
    Ok(n)
}

/// Most tensors one checkpoint may hold, all its files together (`SHARDMERGE_MAX_TENSORS`;
/// default one million: real checkpoints hold hundreds to a few tens of thousands).
pub fn max_tensors() -> usize {
    std::env::var("SHARDMERGE_MAX_TENSORS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1_000_000)
}

/// Parses the JSON header (the bytes after the length prefix) of a file of `file_size` bytes.
///
/// The JSON is read entry by entry (never as one document tree, which takes several times
/// the header's size), each entry checked as it comes; a name given twice is refused (JSON
/// parsers differ on which one wins, so a duplicate could hide a tensor from one of them).
pub fn parse_header(json: &[u8], file_size: u64) -> Result<Header, HeaderError> {
    let data_start = 8 + json.len() as u64;
    if data_start > file_size {
        return err("header runs past the end of the file");
    }
    let data_len = file_size - data_start;
    let text = std::str::from_utf8(json).map_err(|e| {
        HeaderError(format!(
            "header is not UTF-8 (invalid byte at offset {})",
            8 + e.valid_up_to()
        ))
    })?;
    let mut visitor = HeaderVisitor {
        header: Header {
            data_start,
            ..Default::default()
        },
        data_len,
        max_tensors: max_tensors(),
        failed: None,
    };
    let mut de = serde_json::Deserializer::from_str(text.trim_end_matches(' '));
    let parsed =
        serde::Deserializer::deserialize_any(&mut de, &mut visitor).and_then(|()| de.end());
    if let Some(e) = visitor.failed.take() {
        return Err(e);
    }
    if let Err(e) = parsed {
        return err(if e.is_data() {
            format!("header is not a JSON object: {e}")
        } else {
            format!("header is not valid JSON: {e}")
        });
    }
    let header = visitor.header;
    check_overlaps(&header)?;
    Ok(header)
}

/// Builds a [`Header`] from the top-level JSON object, one entry at a time. A check that
/// fails leaves its error in `failed` (the JSON error that stops the parse is then moot).
struct HeaderVisitor {
    header: Header,
    data_len: u64,
    max_tensors: usize,
    failed: Option<HeaderError>,
}

impl HeaderVisitor {
    fn fail<E: serde::de::Error>(&mut self, e: HeaderError) -> E {
        self.failed = Some(e);
        E::custom("header check failed")
    }
}

impl<'de> serde::de::Visitor<'de> for &mut HeaderVisitor {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensor entries")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen_meta = false;
        while let Some(name) = map.next_key::<String>()? {
            // one entry's JSON tree at a time: small, and the checks below name what is wrong
            let entry: Value = map.next_value()?;
            if name == "__metadata__" {
                if seen_meta {
                    return Err(self.fail(HeaderError("__metadata__ is given twice".into())));
                }
                seen_meta = true;
                match parse_metadata(&entry) {
                    Ok(m) => self.header.metadata = m,
                    Err(e) => return Err(self.fail(e)),
                }
                continue;
            }
            if self.header.tensors.len() >= self.max_tensors {
                let e = HeaderError(format!(
                    "more than {} tensors in one file (set SHARDMERGE_MAX_TENSORS to raise the limit)",
                    self.max_tensors
                ));
                return Err(self.fail(e));
            }
            let info = match parse_entry(&name, &entry, self.header.data_start, self.data_len) {
                Ok(i) => i,
                Err(e) => return Err(self.fail(e)),
            };
            if self.header.tensors.contains_key(&name) {
                let e = HeaderError(format!("tensor {name} is given twice in the header"));
                return Err(self.fail(e));
            }
            self.header.tensors.insert(name, info);
        }
        Ok(())
    }
}

fn parse_metadata(v: &Value) -> Result<BTreeMap<String, String>, HeaderError> {
    let Value::Object(m) = v else {
        return err("__metadata__ is not an object");
    };
    let mut out = BTreeMap::new();
    for (k, v) in m {
        match v {
            Value::String(s) => {
                out.insert(k.clone(), s.clone());
            }
            _ => return err(format!("__metadata__.{k} is not a string")),
        }
    }
    Ok(out)
}

fn parse_entry(
    name: &str,
    v: &Value,
    data_start: u64,
    data_len: u64,
) -> Result<TensorInfo, HeaderError> {
    let Value::Object(m) = v else {
        return err(format!("tensor {name}: entry is not an object"));
    };
    let dtype_s = m
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| HeaderError(format!("tensor {name}: missing or non-string dtype")))?;
    let dtype = StDtype::parse(dtype_s)
        .ok_or_else(|| HeaderError(format!("tensor {name}: unknown dtype {dtype_s:?}")))?;
    let shape = parse_u64_list(name, "shape", m)?;
    if shape.len() > MAX_RANK {
        return err(format!(
            "tensor {name}: rank {} is over the limit of {MAX_RANK}",
            shape.len()
        ));
    }
    let offsets = parse_u64_list(name, "data_offsets", m)?;
    if offsets.len() != 2 {
        return err(format!("tensor {name}: data_offsets must have two entries"));
    }
    let (begin, end) = (offsets[0], offsets[1]);
    if end < begin {
        return err(format!(
            "tensor {name}: data_offsets [{begin}, {end}] end before they begin"
        ));
    }
    if end > data_len {
        return err(format!(
            "tensor {name}: data_offsets [{begin}, {end}] are out of bounds: the file has {data_len} data bytes (truncated or corrupt)"
        ));
    }
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| HeaderError(format!("tensor {name}: shape {shape:?} overflows")))?;
    let bytes = numel
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| HeaderError(format!("tensor {name}: shape {shape:?} overflows")))?;
    if bytes != end - begin {
        return err(format!(
            "tensor {name}: shape {shape:?} of {} needs {bytes} bytes but data_offsets [{begin}, {end}] hold {}",
            dtype.name(),
            end - begin
        ));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        start: data_start + begin,
        end: data_start + end,
    })
}

fn parse_u64_list(name: &str, key: &str, m: &Map<String, Value>) -> Result<Vec<u64>, HeaderError> {
    let Some(Value::Array(a)) = m.get(key) else {
        return err(format!("tensor {name}: missing or non-list {key}"));
    };
    if a.len() > 64 {
        return err(format!("tensor {name}: {key} is too long"));
    }
    a.iter()
        .map(|x| {
            x.as_u64().ok_or_else(|| {
                HeaderError(format!(
                    "tensor {name}: {key} has {x}, not a non-negative integer"
                ))
            })
        })
        .collect()
}

fn check_overlaps(h: &Header) -> Result<(), HeaderError> {
    let mut spans: Vec<(u64, u64, &str)> = h
        .tensors
        .iter()
        .filter(|(_, t)| t.end > t.start)
        .map(|(n, t)| (t.start, t.end, n.as_str()))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return err(format!(
                "tensors {} and {} overlap (data_offsets of one start inside the other)",
                w[0].2, w[1].2
            ));
        }
    }
    Ok(())
}

/// A tensor to lay out in a new file.
#[derive(Clone, Debug)]
pub struct LayoutEntry {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
}

/// A laid-out file: its header bytes (length prefix included, padded so data is 8-aligned)
/// and each tensor's absolute byte span, in the order given.
#[derive(Clone, Debug)]
pub struct FileLayout {
    pub header: Vec<u8>,
    pub spans: Vec<(u64, u64)>,
    pub total_size: u64,
}

/// Lays tensors out back to back in the given order, with `metadata` in the header.
/// The header is written as it goes, not built as a JSON tree first (a tree of 200k tensors took
/// 120 MB for a header of 20 MB); names are unique (they are one file's tensors).
pub fn layout_file(entries: &[LayoutEntry], metadata: &BTreeMap<String, String>) -> FileLayout {
    use std::fmt::Write as _;
    // a JSON string literal (serde_json's escaping)
    let quoted = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut text = String::from("{");
    if !metadata.is_empty() {
        text.push_str("\"__metadata__\":{");
        for (k, (key, v)) in metadata.iter().enumerate() {
            let sep = if k > 0 { "," } else { "" };
            let _ = write!(text, "{sep}{}:{}", quoted(key), quoted(v));
        }
        text.push('}');
    }
    let mut rel = Vec::with_capacity(entries.len());
    let mut off = 0u64;
    for e in entries {
        let bytes = e.shape.iter().product::<u64>() * e.dtype.size() as u64;
        let sep = if text.len() > 1 { "," } else { "" };
        let shape: Vec<String> = e.shape.iter().map(u64::to_string).collect();
        let _ = write!(
            text,
            "{sep}{}:{{\"dtype\":{},\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            quoted(&e.name),
            quoted(e.dtype.name()),
            shape.join(","),
            off + bytes
        );
        rel.push((off, off + bytes));
        off += bytes;
    }
    text.push('}');
    let mut json = text.into_bytes();
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut header = Vec::with_capacity(8 + json.len());
    header.extend_from_slice(&(json.len() as u64).to_le_bytes());
    header.extend_from_slice(&json);
    let base = header.len() as u64;
    FileLayout {
        spans: rel.iter().map(|&(a, b)| (base + a, base + b)).collect(),
        total_size: base + off,
        header,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(json: &str, data: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data));
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
        let n = header_len(bytes, bytes.len() as u64)?;
        parse_header(&bytes[8..8 + n as usize], bytes.len() as u64)
    }

    #[test]
    fn roundtrip_layout() {
        let entries = vec![
            LayoutEntry {
                name: "a".into(),
                dtype: DType::BF16,
                shape: vec![3, 5],
            },
            LayoutEntry {
                name: "b".into(),
                dtype: DType::F32,
                shape: vec![7],
            },
        ];
        let mut meta = BTreeMap::new();
        meta.insert("format".into(), "pt".into());
        let l = layout_file(&entries, &meta);
        assert_eq!(l.header.len() % 8, 0);
        let mut file = l.header.clone();
        file.resize(l.total_size as usize, 0);
        let h = parse(&file).unwrap();
        assert_eq!(h.tensors["a"].start, l.spans[0].0);
        assert_eq!(h.tensors["b"].end, l.total_size);
        assert_eq!(h.metadata["format"], "pt");
        // the reference implementation reads what we write
        let st = safetensors::SafeTensors::deserialize(&file).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), &[3, 5]);
    }

    /// The header written as it goes is byte for byte what serializing it as a JSON tree gave
    /// (so outputs stay what they were): names needing escapes, empty and 0-d shapes, with and
    /// without metadata.
    #[test]
    fn streamed_header_is_the_json_tree_serialized() {
        let entries = vec![
            LayoutEntry {
                name: "model.layers.0.q\"\\\u{1}é".into(),
                dtype: DType::BF16,
                shape: vec![3, 5],
            },
            LayoutEntry {
                name: "scalar".into(),
                dtype: DType::F32,
                shape: vec![],
            },
            LayoutEntry {
                name: "z".into(),
                dtype: DType::F16,
                shape: vec![0, 4096],
            },
        ];
        for meta in [
            BTreeMap::new(),
            BTreeMap::from([
                ("format".to_string(), "p\"t".to_string()),
                ("a".into(), "b".into()),
            ]),
        ] {
            let mut obj = Map::new();
            if !meta.is_empty() {
                let m: Map<String, Value> = meta
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect();
                obj.insert("__metadata__".into(), Value::Object(m));
            }
            let mut off = 0u64;
            for e in &entries {
                let bytes = e.shape.iter().product::<u64>() * e.dtype.size() as u64;
                let t: Map<String, Value> = [
                    ("dtype".to_string(), Value::String(e.dtype.name().into())),
                    (
                        "shape".to_string(),
                        Value::Array(e.shape.iter().map(|&d| Value::from(d)).collect()),
                    ),
                    (
                        "data_offsets".to_string(),
                        Value::Array(vec![Value::from(off), Value::from(off + bytes)]),
                    ),
                ]
                .into_iter()
                .collect();
                obj.insert(e.name.clone(), Value::Object(t));
                off += bytes;
            }
            let tree = serde_json::to_vec(&Value::Object(obj)).unwrap();
            let l = layout_file(&entries, &meta);
            let text = &l.header[8..];
            assert_eq!(&text[..tree.len()], &tree[..]);
            assert!(text[tree.len()..].iter().all(|&b| b == b' '));
        }
    }

    #[test]
    fn rejects_length_past_end() {
        let mut f = file_with("{}", 0);
        f[0] = 200;
        let e = parse(&f).unwrap_err();
        assert!(e.0.contains("past the end"), "{e}");
    }

    #[test]
    fn rejects_huge_length() {
        let mut f = vec![0xffu8; 8];
        f.extend_from_slice(b"{}");
        let e = parse(&f).unwrap_err();
        assert!(e.0.contains("limit"), "{e}");
    }

    #[test]
    fn rejects_out_of_bounds_offsets() {
        let f = file_with(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            8,
        );
        let e = parse(&f).unwrap_err();
        assert!(
            e.0.contains("tensor w") && e.0.contains("out of bounds"),
            "{e}"
        );
    }

    #[test]
    fn rejects_overlap() {
        let f = file_with(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            12,
        );
        let e = parse(&f).unwrap_err();
        assert!(e.0.contains("overlap"), "{e}");
    }

    #[test]
    fn rejects_shape_size_mismatch_and_overflow() {
        let f = file_with(
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(parse(&f).unwrap_err().0.contains("needs 12 bytes"));
        let f = file_with(
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4],"data_offsets":[0,8]}}"#,
            8,
        );
        assert!(parse(&f).unwrap_err().0.contains("overflow"));
    }

    #[test]
    fn rejects_garbage() {
        for j in [
            "[1,2]",
            "{\"a\":3}",
            "not json",
            "{\"a\":{\"dtype\":\"Q7\",\"shape\":[],\"data_offsets\":[0,0]}}",
        ] {
            let f = file_with(j, 0);
            assert!(parse(&f).is_err(), "{j}");
        }
        assert!(parse(&[1, 2, 3]).is_err());
    }
}
