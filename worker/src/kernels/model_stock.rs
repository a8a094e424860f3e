//! `model_stock`: Model Stock (Jang et al. 2024).
//!
//! With offsets δᵢ = wᵢ - w₀ of the N fine-tuned models from the base w₀, cos θ is the mean of
//! the pairwise cosines of the offsets, t = N·cos θ / (1 + (N-1)·cos θ), and
//! out = t·mean(wᵢ) + (1 - t)·w₀.
//!
//! By default the cosines are taken over the whole flattened tensor: one statistics pass of
//! exact sums (‖δᵢ‖² and δᵢ·δⱼ). With `filter_wise` they are taken per vector along the last
//! dimension (a 1-D tensor is one vector), which lies inside a row and needs no pass.

use super::dot::DotSum;
use super::{
    BaseRule, KResult, KernelError, Method, MethodSpec, ParamDef, RowRange, Stats, TensorCtx,
};

pub struct ModelStock;

static SPEC: MethodSpec = MethodSpec {
    name: "model_stock",
    params: &[ParamDef::flag("filter_wise", false)],
    tensor_params: &[],
    base: BaseRule::Required,
    min_models: 3,
    max_models: None,
};

/// Sums of one group of vectors: ‖δᵢ‖² for each i, then δᵢ·δⱼ for each pair i < j.
fn gram(base: &[f32], others: &[&[f32]], sums: &mut [DotSum], range: std::ops::Range<usize>) {
    const CHUNK: usize = 1024;
    let n = others.len();
    let mut d = vec![0f32; n * CHUNK];
    let mut at0 = range.start;
    while at0 < range.end {
        let end = (at0 + CHUNK).min(range.end);
        let m = end - at0;
        for (o, di) in others.iter().zip(d.chunks_exact_mut(CHUNK)) {
            for ((x, &v), &b) in di.iter_mut().zip(&o[at0..end]).zip(&base[at0..end]) {
                *x = v - b;
            }
        }
        let mut at = n;
        for i in 0..n {
            let di = &d[i * CHUNK..][..m];
            sums[i].add_products(di, di);
            for j in i + 1..n {
                sums[at].add_products(di, &d[j * CHUNK..][..m]);
                at += 1;
            }
        }
        at0 = end;
    }
}

/// The interpolation factor t from the reduced sums.
fn factor(n: usize, sums: &[f64]) -> f32 {
    let norms: Vec<f32> = sums[..n].iter().map(|&s| s.sqrt() as f32).collect();
    let mut cos_sum = 0f32;
    let mut at = n;
    let mut pairs = 0;
    for i in 0..n {
        for j in i + 1..n {
            let dot = sums[at] as f32;
            at += 1;
            let c = (dot / (norms[i] * norms[j]).max(1e-6)).clamp(-1.0, 1.0);
            cos_sum += c;
            pairs += 1;
        }
    }
    let cos = cos_sum / pairs as f32;
    let nf = n as f32;
    (nf * cos) / (1.0 + (nf - 1.0) * cos)
}

fn split<'a>(ctx: &TensorCtx, inputs: &[&'a [f32]]) -> KResult<(&'a [f32], Vec<&'a [f32]>)> {
    let b = ctx.base_index("model_stock")?;
    let base = *inputs
        .get(b)
        .ok_or_else(|| KernelError::missing("model_stock: base input is missing"))?;
    let others: Vec<&[f32]> = ctx.others().into_iter().map(|i| inputs[i]).collect();
    Ok((base, others))
}

fn blend(t: f32, base: &[f32], others: &[&[f32]], out: &mut [f32], range: std::ops::Range<usize>) {
    let n = others.len() as f32;
    for e in range {
        let mut s = 0f32;
        for o in others {
            s += o[e];
        }
        out[e] = t * (s / n) + (1.0 - t) * base[e];
    }
}

impl Method for ModelStock {
    fn spec(&self) -> &MethodSpec {
        &SPEC
    }

    fn check(&self, ctx: &TensorCtx) -> KResult<()> {
        let fw = ctx.param("filter_wise")?;
        if fw != 0.0 && fw != 1.0 {
            return Err(KernelError::param(format!(
                "model_stock: parameter filter_wise must be a boolean, got {fw}"
            )));
        }
        ctx.base_index("model_stock")?;
        if ctx.others().len() < 2 {
            return Err(KernelError::shape(format!(
                "model_stock needs a base_model and at least two other models, got {} other(s)",
                ctx.others().len()
            )));
        }
        Ok(())
    }

    fn passes(&self, ctx: &TensorCtx) -> u32 {
        if ctx.flag("filter_wise").unwrap_or(false) {
            0
        } else {
            1
        }
    }

    fn partial(
        &self,
        ctx: &TensorCtx,
        _pass: u32,
        _state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
    ) -> KResult<Stats> {
        let (base, others) = split(ctx, inputs)?;
        let n = others.len();
        let mut sums: Vec<DotSum> = (0..n + n * n.saturating_sub(1) / 2)
            .map(|_| DotSum::new())
            .collect();
        gram(base, &others, &mut sums, 0..base.len());
        Ok(Stats {
            sums: sums.into_iter().map(DotSum::finish).collect(),
            ..Default::default()
        })
    }

    fn apply(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        _rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()> {
        let (base, others) = split(ctx, inputs)?;
        let n = others.len();
        if n == 0 {
            out.copy_from_slice(base);
            return Ok(());
        }
        if n < 2 {
            return Err(KernelError::shape(
                "model_stock needs at least 3 models (base plus two or more others)",
            ));
        }
        let npairs = n + n * (n - 1) / 2;
        if !ctx.flag("filter_wise")? {
            if state.values.len() != npairs {
                return Err(KernelError::missing("model_stock: statistics are missing"));
            }
            let t = factor(n, &state.values);
            blend(t, base, &others, out, 0..out.len());
            return Ok(());
        }
        // one vector per last-dimension slice (a 1-D tensor is one vector)
        let len = match ctx.shape.last() {
            Some(&l) if ctx.shape.len() >= 2 => l as usize,
            _ => ctx.row_len,
        };
        if len == 0 {
            return Ok(());
        }
        let mut sums: Vec<DotSum> = (0..npairs).map(|_| DotSum::new()).collect();
        let mut vals = vec![0f64; npairs];
        let mut s = 0;
        while s < out.len() {
            let e = (s + len).min(out.len());
            gram(base, &others, &mut sums, s..e);
            for (v, x) in vals.iter_mut().zip(&mut sums) {
                *v = x.take().value();
            }
            blend(factor(n, &vals), base, &others, out, s..e);
            s = e;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

    fn case(shape: &[u64], n: usize, filter_wise: bool) -> Case {
        let mut c = Case::new(shape, n).with_defaults(&ModelStock);
        c.base = Some(n - 1);
        c.params
            .insert("filter_wise".into(), filter_wise as u8 as f64);
        c
    }

    #[test]
    fn hand_checked() {
        // offsets (1,0) and (0,1): cos 0 -> t = 0 -> base
        let c = case(&[2], 3, false);
        let out = run(
            &ModelStock,
            &c,
            &[vec![2.0, 1.0], vec![1.0, 2.0], vec![1.0, 1.0]],
        );
        assert_eq!(out, vec![1.0, 1.0]);
        // offsets (1,1) and (1,0): cos = 1/sqrt2, t = 2c/(1+c)
        let out = run(
            &ModelStock,
            &c,
            &[vec![2.0, 2.0], vec![2.0, 1.0], vec![1.0, 1.0]],
        );
        let cos = 1.0 / 2f64.sqrt();
        let t = 2.0 * cos / (1.0 + cos);
        let want = [t * 2.0 + (1.0 - t), t * 1.5 + (1.0 - t)];
        for (o, w) in out.iter().zip(want) {
            assert!((*o as f64 - w).abs() < 1e-6, "{o} {w}");
        }
        // filter-wise: row 0 like the first example, row 1 identical offsets (t = 1)
        let c = case(&[2, 2], 3, true);
        let out = run(
            &ModelStock,
            &c,
            &[
                vec![2.0, 1.0, 3.0, 3.0],
                vec![1.0, 2.0, 3.0, 3.0],
                vec![1.0, 1.0, 1.0, 1.0],
            ],
        );
        assert_eq!(out, vec![1.0, 1.0, 3.0, 3.0]);
    }

    #[test]
    fn whole_equals_cut() {
        for fw in [false, true] {
            for shape in [vec![37u64, 19], vec![101], vec![9, 4, 5]] {
                let n = shape.iter().product::<u64>() as usize;
                let c = case(&shape, 4, fw);
                let ins = vec![
                    data(n, 1, 1.0),
                    data(n, 2, 1.0),
                    data(n, 3, 0.5),
                    data(n, 4, 0.2),
                ];
                let whole = run(&ModelStock, &c, &ins);
                for k in [1, 2, 5, 7, 36, 100] {
                    let cut = run_cut(&ModelStock, &c, &ins, k);
                    assert!(whole
                        .iter()
                        .zip(&cut)
                        .all(|(a, b)| a.to_bits() == b.to_bits()));
                }
            }
        }
    }

    #[test]
    fn rejects_bad_models_and_params() {
        let c = case(&[3], 2, false);
        let e = ModelStock.check(&c.ctx()).unwrap_err();
        assert!(
            e.message().contains("model_stock") && e.message().contains("at least two"),
            "{e}"
        );
        let mut c = case(&[3], 3, false);
        c.base = None;
        assert!(ModelStock
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("model_stock needs a base_model"));
        let mut c = case(&[3], 3, false);
        c.params.insert("filter_wise".into(), 2.0);
        assert!(ModelStock
            .check(&c.ctx())
            .unwrap_err()
            .message()
            .contains("filter_wise"));
    }
}
