//! Every method on degenerate inputs (equal, parallel, antipodal, zero, partly zero tensors;
//! zero tolerances; weights that cancel): the output is finite, or the method refuses with an
//! error naming itself. Never a NaN or an infinity out of finite inputs.

use super::testutil::*;
use super::*;

const SHAPE: [u64; 2] = [3, 4];

fn base_vec() -> Vec<f32> {
    vec![
        1.0, -2.0, 3.0, 0.5, //
        0.25, 4.0, -1.0, 2.0, //
        -3.0, 0.75, 1.5, -0.5,
    ]
}

fn scaled(x: &[f32], k: f32) -> Vec<f32> {
    x.iter().map(|v| v * k).collect()
}

/// Named sets of `n` inputs.
fn input_sets(n: usize) -> Vec<(&'static str, Vec<Vec<f32>>)> {
    let x = base_vec();
    let zero = vec![0f32; x.len()];
    let mut row_zero = x.clone();
    row_zero[4..8].iter_mut().for_each(|v| *v = 0.0);
    vec![
        ("equal", vec![x.clone(); n]),
        (
            "parallel",
            (0..n).map(|i| scaled(&x, (i + 1) as f32)).collect(),
        ),
        (
            "antipodal",
            (0..n)
                .map(|i| scaled(&x, if i % 2 == 0 { 1.0 } else { -1.0 }))
                .collect(),
        ),
        ("all zero", vec![zero.clone(); n]),
        ("first zero", {
            let mut v = vec![x.clone(); n];
            v[0] = zero.clone();
            v
        }),
        ("others zero", {
            let mut v = vec![zero.clone(); n];
            v[0] = x.clone();
            v
        }),
        ("a zero row", vec![row_zero; n]),
        ("tiny", vec![scaled(&x, 1e-30); n]),
    ]
}

/// Parameter variants: defaults, then every tolerance-like parameter at zero, then weights
/// that cancel.
fn cases(m: &dyn Method, n: usize) -> Vec<(String, Case)> {
    let spec = m.spec();
    let mut c = Case::new(&SHAPE, n);
    if spec.base != BaseRule::Ignored {
        c.base = Some(0);
    }
    for p in spec.params {
        if p.default.is_none() {
            c.params.insert(p.name.into(), 0.5);
        }
    }
    for mp in &mut c.model_params {
        for p in spec.tensor_params {
            if p.default.is_none() {
                mp.insert(p.name.into(), 0.5);
            }
        }
    }
    let c = c.with_defaults(m);
    let mut out = Vec::new();
    let tol_names = ["tol", "eps", "epsilon"];
    if spec.params.iter().any(|p| tol_names.contains(&p.name)) {
        let mut z = clone_case(&c);
        for t in tol_names {
            if let Some(v) = z.params.get_mut(t) {
                *v = 0.0;
            }
        }
        out.push(("tolerances 0".to_string(), z));
    }
    if spec.tensor_params.iter().any(|p| p.name == "weight") && n >= 2 {
        let mut z = clone_case(&c);
        for (i, mp) in z.model_params.iter_mut().enumerate() {
            mp.insert("weight".into(), if i % 2 == 0 { 0.5 } else { -0.5 });
        }
        if n % 2 == 1 {
            z.model_params[n - 1].insert("weight".into(), 0.0);
        }
        out.push(("weights cancel".to_string(), z));
        let mut z = clone_case(&c);
        for mp in &mut z.model_params {
            mp.insert("weight".into(), 0.0);
        }
        out.push(("weights 0".to_string(), z));
    }
    out.insert(0, ("defaults".to_string(), c));
    out
}

fn clone_case(c: &Case) -> Case {
    Case {
        name: c.name.clone(),
        shape: c.shape.clone(),
        params: c.params.clone(),
        model_params: c.model_params.clone(),
        base: c.base,
        seed: c.seed,
        rng: c.rng,
        work_bf16: c.work_bf16,
        work: c.work,
    }
}

#[test]
fn every_method_stays_finite_or_refuses_by_name() {
    let mut failures = Vec::new();
    for m in registry() {
        let spec = m.spec();
        let lo = spec.min_models.max(2);
        let hi = spec.max_models.unwrap_or(3).min(3);
        let ns: Vec<usize> = if spec.max_models == Some(1) {
            vec![1]
        } else {
            (lo..=hi.max(lo)).collect()
        };
        for n in ns {
            for (pname, case) in cases(*m, n) {
                let ctx = case.ctx();
                if m.check(&ctx).is_err() {
                    continue; // refused at plan time, with its own message
                }
                for (iname, ins) in input_sets(n) {
                    let refs: Vec<&[f32]> = ins.iter().map(Vec::as_slice).collect();
                    let mut out = vec![f32::NAN; ctx.numel() as usize];
                    let what = format!("{} n={n} {pname} {iname}", spec.name);
                    match run_whole(*m, &ctx, &refs, &mut out) {
                        Ok(()) => {
                            if let Some(k) = out.iter().position(|v| !v.is_finite()) {
                                failures.push(format!("{what}: element {k} is {}", out[k]));
                            }
                        }
                        Err(e) if e.message().contains(spec.name) => {}
                        Err(e) => failures.push(format!("{what}: error without the method: {e}")),
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
