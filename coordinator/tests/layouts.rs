//! Inputs as real users bring them: bfloat16 and float16 checkpoints, sharded checkpoints with
//! an index, odd (non-power-of-two) shapes and a model with a different vocabulary size. Every
//! golden recipe runs on each variant.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use shardmerge_worker::format::dtype::{self, DType};
use shardmerge_worker::kernels::{method, registry, BaseRule, MethodSpec};

const MODELS: &[&str] = &["base", "instruct", "lang_eu", "lang_ca", "lang_gl"];

fn cases() -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden().join("cases.json")).unwrap()).unwrap();
    v["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["case"].as_str().unwrap().to_string())
        .collect()
}

fn recipe(case: &str) -> String {
    std::fs::read_to_string(golden().join("cases").join(case).join("config.yml")).unwrap()
}

/// Writes every golden model through `f` into `dir/models/NAME`.
fn derive(dir: &Path, f: impl Fn(&str, &BTreeMap<String, Tensor>, &Path)) {
    for m in MODELS {
        let src = golden().join("models").join(m);
        let t = load(&src);
        let dst = dir.join("models").join(m);
        f(m, &t, &dst);
    }
}

fn round_to(t: &BTreeMap<String, Tensor>, dt: DType) -> BTreeMap<String, Tensor> {
    t.iter()
        .map(|(k, v)| {
            let mut b = vec![0u8; v.values.len() * dt.size()];
            dtype::encode(dt, &v.values, &mut b);
            let mut r = vec![0f32; v.values.len()];
            dtype::decode(dt, &b, &mut r);
            (
                k.clone(),
                Tensor {
                    values: r,
                    ..v.clone()
                },
            )
        })
        .collect()
}

/// 16-bit inputs are read exactly: merging bf16 (f16) files gives the same bytes as merging
/// f32 files holding the same values.
async fn sixteen_bit(dt: DType) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("half"), tmp.path().join("wide"));
    derive(&a, |m, t, d| {
        write(
            d,
            &round_to(t, dt),
            dt,
            None,
            Some(&golden().join("models").join(m).join("config.json")),
        )
    });
    derive(&b, |m, t, d| {
        write(
            d,
            &round_to(t, dt),
            DType::F32,
            None,
            Some(&golden().join("models").join(m).join("config.json")),
        )
    });
    for c in cases() {
        let r = recipe(&c);
        let (oa, ob) = (
            tmp.path().join(format!("{c}-a")),
            tmp.path().join(format!("{c}-b")),
        );
        run(&r, &a, &oa, 2, 64 << 20, 512 << 20).await.unwrap();
        run(&r, &b, &ob, 2, 64 << 20, 512 << 20).await.unwrap();
        assert_eq!(
            file_bytes(&oa),
            file_bytes(&ob),
            "{c}: {dt:?} inputs differ from the same values in f32"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_inputs() {
    sixteen_bit(DType::BF16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f16_inputs() {
    sixteen_bit(DType::F16).await;
}

/// A whole tensor of a statistics method computed from bf16 inputs as stored (the read bytes,
/// widened chunk by chunk): a NaN in the base model's input is passed through with a warning, as
/// mergekit does, and finite inputs turned into infinities by the weight and lambda fail the
/// job naming the tensor. (The inputs' finiteness is then read from the stored bytes: the
/// slot's decoded buffers hold another task's values.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_inputs_judge_non_finite_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let nan_in = |nan: bool| {
        move |m: &str, t: &BTreeMap<String, Tensor>, d: &Path| {
            let mut t = round_to(t, DType::BF16);
            if nan && m == "base" {
                let v = t.get_mut("model.layers.1.mlp.up_proj.weight").unwrap();
                v.values[5] = f32::NAN;
            }
            let cfg = golden().join("models").join(m).join("config.json");
            write(d, &t, DType::BF16, None, Some(&cfg))
        }
    };
    let ties = |w: &str| {
        format!("merge_method: ties\nbase_model: models/base\ndtype: bfloat16\nparameters: {{normalize: false, lambda: {w}}}\nmodels:\n- model: models/instruct\n  parameters: {{weight: {w}, density: 0.5}}\n- model: models/lang_eu\n  parameters: {{weight: 1.0, density: 0.7}}\n")
    };
    let (a, b) = (tmp.path().join("nan"), tmp.path().join("clean"));
    derive(&a, nan_in(true));
    derive(&b, nan_in(false));
    run(
        &ties("1.0"),
        &a,
        &tmp.path().join("o1"),
        2,
        64 << 20,
        512 << 20,
    )
    .await
    .expect("a NaN in is a NaN out, with a warning");
    let e = run(
        &ties("1e30"),
        &b,
        &tmp.path().join("o2"),
        2,
        64 << 20,
        512 << 20,
    )
    .await
    .expect_err("finite inputs, infinite output");
    assert!(
        e.contains("turned finite inputs into a non-finite output"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_output_is_rounded_to_nearest_even() {
    // task_arithmetic_lambda_bf16 writes bfloat16: compare with the f32 result rounded once
    let g = golden();
    let tmp = tempfile::tempdir().unwrap();
    let r = recipe("task_arithmetic_lambda_bf16");
    let out = tmp.path().join("o");
    run(&r, &g, &out, 2, 64 << 20, 512 << 20).await.unwrap();
    let f32r = r.replace("out_dtype: bfloat16\n", "");
    let out32 = tmp.path().join("o32");
    run(&f32r, &g, &out32, 2, 64 << 20, 512 << 20)
        .await
        .unwrap();
    let (a, b) = (load(&out), load(&out32));
    for (n, t) in &a {
        assert_eq!(t.dtype, DType::BF16);
        let mut want = vec![0u8; t.raw.len()];
        dtype::encode(DType::BF16, &b[n].values, &mut want);
        assert_eq!(t.raw, want, "{n}");
    }
}

/// Sharded inputs with an index merge to the same bytes as single-file inputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("sharded");
    derive(&s, |m, t, d| {
        write(
            d,
            t,
            DType::F32,
            Some(150_000),
            Some(&golden().join("models").join(m).join("config.json")),
        )
    });
    assert!(s.join("models/base/model.safetensors.index.json").exists());
    for c in cases() {
        let r = recipe(&c);
        let (oa, ob) = (
            tmp.path().join(format!("{c}-a")),
            tmp.path().join(format!("{c}-b")),
        );
        run(&r, &golden(), &oa, 2, 64 << 20, 512 << 20)
            .await
            .unwrap();
        run(&r, &s, &ob, 2, 64 << 20, 512 << 20).await.unwrap();
        assert_eq!(
            file_bytes(&oa),
            file_bytes(&ob),
            "{c}: sharded inputs changed the output"
        );
    }
}

fn odd(d: u64, vocab: u64) -> u64 {
    match d {
        64 => 47,
        256 => vocab,
        160 => 97,
        32 => 21,
        x => x,
    }
}

/// The golden family with odd shapes (47 hidden, 97 intermediate, 21 head dim), in bf16, one
/// model with a larger vocabulary (253 rows of embeddings against 251) and one sharded.
fn odd_family(o: &Path) {
    derive(o, |m, t, d| {
        let vocab = if m == "lang_ca" { 253 } else { 251 };
        let cropped: BTreeMap<String, Tensor> = t
            .iter()
            .map(|(k, v)| {
                let shape: Vec<u64> = v.shape.iter().map(|&x| odd(x, vocab)).collect();
                let values = if v.shape.len() == 2 {
                    let (c_in, c_out) = (v.shape[1] as usize, shape[1] as usize);
                    (0..shape[0] as usize)
                        .flat_map(|r| v.values[r * c_in..r * c_in + c_out].to_vec())
                        .collect()
                } else {
                    v.values[..shape[0] as usize].to_vec()
                };
                (
                    k.clone(),
                    Tensor {
                        shape,
                        values,
                        ..v.clone()
                    },
                )
            })
            .collect();
        write(
            d,
            &cropped,
            DType::BF16,
            if m == "lang_gl" { Some(40_000) } else { None },
            Some(&golden().join("models").join(m).join("config.json")),
        );
    });
}

/// Odd shapes and a model with a larger vocabulary (with --unsafe-truncate-embeddings its
/// embeddings are cropped to the common submatrix): every method gives the same bytes whole
/// and cut into tiny tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_shapes_and_vocab_split_invariant() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("odd");
    odd_family(&o);
    for c in cases() {
        let r = recipe(&c);
        let (oa, ob) = (
            tmp.path().join(format!("{c}-a")),
            tmp.path().join(format!("{c}-b")),
        );
        run_truncating(&r, &o, &oa, 1, 64 << 20, 512 << 20)
            .await
            .unwrap_or_else(|e| panic!("{c}: {e}"));
        run_truncating(&r, &o, &ob, 3, 1000, 24 << 10)
            .await
            .unwrap_or_else(|e| panic!("{c}: {e}"));
        assert_eq!(
            file_bytes(&oa),
            file_bytes(&ob),
            "{c}: odd shapes, output depends on the task layout"
        );
        let t = load(&oa);
        let embed = &t["model.embed_tokens.weight"];
        assert_eq!(embed.shape, vec![251, 47], "{c}");
    }
}

/// Randomised methods draw the same numbers whatever folder (or bucket) the models are in:
/// the RNG is keyed by a model's position among the inputs, not by its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_draws_do_not_depend_on_model_location() {
    let tmp = tempfile::tempdir().unwrap();
    let moved = tmp.path().join("elsewhere");
    derive(&moved, |m, t, d| {
        write(
            d,
            t,
            DType::F32,
            None,
            Some(&golden().join("models").join(m).join("config.json")),
        )
    });
    for c in ["dare_ties", "dare_linear", "della"] {
        let r = recipe(c);
        let (oa, ob) = (
            tmp.path().join(format!("{c}-a")),
            tmp.path().join(format!("{c}-b")),
        );
        run(&r, &golden(), &oa, 2, 64 << 20, 512 << 20)
            .await
            .unwrap();
        run(
            &retarget(&r, &moved.join("models")),
            &golden(),
            &ob,
            2,
            64 << 20,
            512 << 20,
        )
        .await
        .unwrap();
        assert_eq!(
            file_bytes(&oa),
            file_bytes(&ob),
            "{c}: output depends on where the models are"
        );
    }
}

/// A recipe for `spec` over the golden family: the base when the method takes one, then as
/// many of the other models as it accepts (up to 3 inputs in all), every required parameter
/// set, sparsification on (density 0.5), and `extra` method parameters.
fn recipe_for(spec: &MethodSpec, extra: &[(&str, f64)]) -> String {
    let uses_base = spec.base != BaseRule::Ignored;
    let n = 3.clamp(spec.min_models, spec.max_models.unwrap_or(usize::MAX));
    let others = &["instruct", "lang_eu", "lang_ca", "lang_gl"][..n - usize::from(uses_base)];
    let mut y = format!("merge_method: {}\n", spec.name);
    if uses_base {
        y += "base_model: models/base\n";
    }
    let takes = |name: &str| spec.tensor_params.iter().any(|p| p.name == name);
    y += "models:\n";
    for m in others {
        y += &format!("  - model: models/{m}\n");
        let mut ps = Vec::new();
        if takes("weight") {
            ps.push(("weight", 1.0));
        }
        if takes("density") {
            ps.push(("density", 0.5));
            if takes("epsilon") {
                ps.push(("epsilon", 0.1));
            }
        }
        if !ps.is_empty() {
            y += "    parameters:\n";
            for (k, v) in ps {
                y += &format!("      {k}: {v}\n");
            }
        }
    }
    let mut ps: Vec<(&str, f64)> = Vec::new();
    for p in spec.params {
        match p.name {
            "t" => ps.push(("t", 0.5)),
            "select_topk" => ps.push(("select_topk", 0.5)),
            other => assert!(p.default.is_some(), "{}: set required {other}", spec.name),
        }
    }
    ps.extend_from_slice(extra);
    if !ps.is_empty() {
        y += "parameters:\n";
        for (k, v) in ps {
            y += &format!("  {k}: {v}\n");
        }
    }
    y
}

/// Every registered method (and the variants no golden case covers: nuslerp row- and
/// column-wise, model_stock filter-wise) on bf16, sharded, odd-shaped inputs with mismatched
/// vocabularies: the same bytes whole and cut into tiny tasks, bf16 output, the embeddings
/// cropped to the common submatrix (--unsafe-truncate-embeddings).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_on_odd_bf16_sharded_inputs_is_split_invariant() {
    let tmp = tempfile::tempdir().unwrap();
    let o = tmp.path().join("odd");
    odd_family(&o);
    let mut runs: Vec<(String, String)> = registry()
        .iter()
        .map(|m| (m.spec().name.to_string(), recipe_for(m.spec(), &[])))
        .collect();
    let spec = |name: &str| method(name).expect(name).spec();
    for (label, name, extra) in [
        (
            "nuslerp-rows",
            "nuslerp",
            vec![("nuslerp_flatten", 0.0), ("nuslerp_row_wise", 1.0)],
        ),
        ("nuslerp-columns", "nuslerp", vec![("nuslerp_flatten", 0.0)]),
        (
            "model_stock-filter-wise",
            "model_stock",
            vec![("filter_wise", 1.0)],
        ),
    ] {
        runs.push((label.to_string(), recipe_for(spec(name), &extra)));
    }
    for (label, r) in &runs {
        let (oa, ob) = (
            tmp.path().join(format!("{label}-a")),
            tmp.path().join(format!("{label}-b")),
        );
        run_truncating(r, &o, &oa, 1, 64 << 20, 512 << 20)
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}\n{r}"));
        run_truncating(r, &o, &ob, 3, 1000, 24 << 10)
            .await
            .unwrap_or_else(|e| panic!("{label}: {e}\n{r}"));
        assert_eq!(
            file_bytes(&oa),
            file_bytes(&ob),
            "{label}: output depends on the task layout"
        );
        let t = load(&oa);
        assert_eq!(
            t["model.embed_tokens.weight"].shape,
            vec![251, 47],
            "{label}"
        );
        assert!(
            t.values().all(|x| x.dtype == DType::BF16),
            "{label}: bf16 inputs give bf16 output"
        );
    }
}

/// The planner charges a statistics tensor of 16-bit local inputs what the worker holds for it:
/// its f32 output and the walk's working space, its inputs mapped (page cache). In slots
/// where that fits and the general path's figure (every input raw and as f32) does not, the
/// bf16 checkpoint's tensors stay whole and the same values stored as f32 are cut into
/// statistics units; both merge to the same bytes (`bf16_inputs`).
#[tokio::test]
async fn statistics_tensors_of_16_bit_local_inputs_are_charged_as_mapped() {
    use shardmerge::job::SubmitOptions;
    use shardmerge::planinfo;
    use shardmerge_worker::storage::Resolver;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("half"), tmp.path().join("wide"));
    for (dir, dt) in [(&a, DType::BF16), (&b, DType::F32)] {
        derive(dir, |m, t, d| {
            let cfg = golden().join("models").join(m).join("config.json");
            write(d, &round_to(t, DType::BF16), dt, None, Some(&cfg))
        });
    }
    let ties = recipe("ties_multilingual");
    let describe = |dir: &Path, slot_memory: u64| {
        let o = SubmitOptions {
            base_dir: dir.to_path_buf(),
            task_size: 4096,
            slot_memory,
            ..Default::default()
        };
        let ties = ties.clone();
        async move { (planinfo::describe(&ties, &o, 2, &Resolver::new()).await).unwrap() }
    };
    let info = describe(&a, 1 << 30).await;
    let n = (info.plan.tensors.iter())
        .filter(|t| t.passes > 0)
        .map(|t| t.shape.iter().product::<u64>())
        .max()
        .unwrap();
    let (half, wide) = (describe(&a, 16 * n).await, describe(&b, 16 * n).await);
    assert!(
        half.cut.units.is_empty(),
        "bf16 inputs: {} statistics units",
        half.cut.units.len()
    );
    assert!(!wide.cut.units.is_empty(), "f32 inputs: no statistics unit");
}
