//! Where things go: draws in mergekit's order, tensors into output files, rows of a tensor.

use super::*;

/// Gives every randomised (tensor, input) its place in mergekit's draw stream. mergekit runs
/// its merge tasks in order of their group label (the largest input tensor name, compared as
/// Python compares strings: by code point, which is UTF-8 byte order), and each task draws
/// once per element for each input in recipe order. Ties keep output order. A non-float tensor
/// (copied, not merged, here) takes the draws mergekit spends on it: mergekit casts it to the
/// recipe's dtype and merges it like the others, so later tensors' draws come after its own.
pub(super) fn lay_out_draws(method: &dyn Method, tensors: &mut [pb::TensorJob]) -> Result<()> {
    let mut order: Vec<(String, usize)> = tensors
        .iter()
        .enumerate()
        .map(|(k, t)| {
            let label = t.inputs.iter().map(|s| s.tensor.as_str()).max();
            (label.unwrap_or_default().to_string(), k)
        })
        .collect();
    order.sort();
    let mut at = 0u64;
    for (_, k) in order {
        let copy = is_copy(&tensors[k]);
        let counts = {
            let ctx = shardmerge_worker::tensor::tensor_ctx(&tensors[k]).map_err(Error::Input)?;
            method.draws(&ctx)
        };
        for (src, n) in tensors[k].inputs.iter_mut().zip(counts) {
            src.rng_offset = if copy { 0 } else { at };
            at = at.checked_add(n).ok_or_else(|| {
                Error::Input("more random draws than a 64-bit stream position holds".into())
            })?;
        }
    }
    Ok(())
}

/// Lays tensors into files of at most `max` bytes (a tensor larger than that gets its own).
pub(super) fn layout_files(tensors: &[pb::TensorJob], max: u64) -> Vec<OutFile> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let es = DType::from_proto(t.out_dtype).map_or(4, |d| d.size()) as u64;
        let bytes = t.shape.iter().product::<u64>() * es;
        let last = groups.len() - 1;
        if !groups[last].is_empty() && max > 0 && cur + bytes > max {
            groups.push(Vec::new());
            cur = 0;
        }
        let last = groups.len() - 1;
        groups[last].push(i);
        cur += bytes;
    }
    let n = groups.len();
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    groups
        .into_iter()
        .enumerate()
        .map(|(k, idx)| {
            let entries: Vec<LayoutEntry> = idx
                .iter()
                .map(|&i| LayoutEntry {
                    name: tensors[i].name.clone(),
                    dtype: DType::from_proto(tensors[i].out_dtype).unwrap_or(DType::F32),
                    shape: tensors[i].shape.clone(),
                })
                .collect();
            OutFile {
                name: if n == 1 {
                    "model.safetensors".into()
                } else {
                    format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
                },
                tensors: idx,
                layout: st::layout_file(&entries, &meta),
            }
        })
        .collect()
}

/// Number of rows in a tensor's 2-D view and bytes per output row.
pub(crate) fn rows_of(t: &pb::TensorJob) -> (u64, u64) {
    let (rows, row_len) = view2d(&t.shape);
    let es = DType::from_proto(t.out_dtype).map_or(4, |d| d.size()) as u64;
    (rows, row_len * es)
}
