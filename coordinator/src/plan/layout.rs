//! Where things go: draws in mergekit's order, tensors into output files.

use super::*;

/// Gives every randomised (tensor, input) its place in mergekit's draw stream. mergekit runs
/// its merge tasks in order of their group label (the largest input tensor name, compared as
/// Python compares strings: by code point, which is UTF-8 byte order), and each task draws
/// once per element for each input in recipe order. Ties keep output order. A non-float tensor
/// (copied, not merged, here) takes the draws mergekit spends on it: mergekit casts it to the
/// recipe's dtype and merges it like the others, so later tensors' draws come after its own.
pub(super) fn lay_out_draws(method: &dyn Method, tensors: &mut [TensorPlan]) -> Result<()> {
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
        let copy = tensors[k].is_copy();
        let counts = method.draws(&tensors[k].ctx()?);
        for (src, n) in tensors[k].inputs.iter_mut().zip(counts) {
            src.rng_offset = if copy { 0 } else { at };
            at = at.checked_add(n).ok_or_else(|| {
                Error::input("", "more random draws than a 64-bit stream position holds")
            })?;
        }
    }
    Ok(())
}

/// Lays tensors into files of at most `max` bytes (a tensor larger than that gets its own).
pub(super) fn layout_files(tensors: &[TensorPlan], max: u64) -> Vec<OutFile> {
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut cur = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = t.shape.iter().product::<u64>() * t.out_dtype.size() as u64;
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
                    dtype: tensors[i].out_dtype,
                    shape: tensors[i].shape.clone(),
                })
                .collect();
            OutFile {
                name: if n == 1 {
                    names::SINGLE_FILE.into()
                } else {
                    names::shard(k, n)
                },
                tensors: idx,
                layout: st::layout_file(&entries, &meta),
            }
        })
        .collect()
}
