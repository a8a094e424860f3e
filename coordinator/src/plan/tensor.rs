//! One output tensor's job: its inputs, shape, parameters, or a plain copy for non-float tensors.

use shardmerge_worker::kernels::round::Work;

use super::*;

pub(super) fn plan_tensor(
    cx: &Ctx,
    s: &Slice,
    out_name: &str,
    in_names: &[String],
    t: f64,
) -> Result<TensorPlan> {
    let spec = cx.method.spec();
    let (inputs, infos) = tensor_inputs(cx, s, out_name, in_names)?;
    let base = base_index(cx, s);
    if inputs.iter().any(|i| !i.dtype.is_float()) {
        let (params, model_params) = job_params(cx, s, out_name, in_names, t, base)?;
        let mut job = copy_job(cx, out_name, inputs, reference_source(cx, s))?;
        keep_params(
            &mut job,
            params,
            model_params,
            base,
            reference_source(cx, s),
        );
        return Ok(job);
    }
    let remap = cx
        .vocab
        .filter(|_| cx.arch.is_embedding(out_name) && infos.iter().all(|i| i.shape.len() == 2));
    let shape = match remap {
        Some(v) => vocab_shape(out_name, v.rows, &s.sources, &infos)?,
        None => out_shape(cx, out_name, &s.sources, &infos)?,
    };
    let (params, model_params) = job_params(cx, s, out_name, in_names, t, base)?;
    let base_dtype = inputs[base.unwrap_or(0)].model_dtype();
    let out_dtype = cx
        .recipe
        .out_dtype
        .or(cx.recipe.dtype)
        .unwrap_or(base_dtype);
    let mut job = TensorPlan {
        name: out_name.to_string(),
        shape,
        out_dtype,
        method: cx.method,
        params,
        inputs,
        model_params,
        base,
        seed: cx.seed,
        rng: cx.rng,
        // mergekit loads every input in the recipe's dtype, else casts to the base's
        work_dtype: Some(cx.recipe.dtype.unwrap_or(base_dtype)),
        // mergekit's arithmetic: every op rounds to the recipe's 16-bit dtype
        compute: match cx.recipe.dtype {
            Some(DType::BF16) if !cx.compute_float32 => Work::BF16,
            Some(DType::F16) if !cx.compute_float32 => Work::F16,
            _ => Work::F32,
        },
        row_map: None,
        passes: 0,
    };
    if let Some(v) = remap {
        if let Some(i) = job.inputs.iter().find(|i| i.lora.is_some()) {
            return Err(Error::plan(out_name, format!("model {} applies a LoRA adapter to this embedding, which the tokenizer configuration re-maps by token: not supported (merge the adapter without `tokenizer_source`/`tokenizer:`)", i.model)));
        }
        let models: Vec<&str> = s.sources.iter().map(|x| x.model.as_str()).collect();
        let rows: Vec<u64> = infos.iter().map(|i| i.shape[0]).collect();
        job.row_map = Some(v.row_map(out_name, &models, &rows, base)?);
    }
    let ctx = job.ctx()?;
    cx.method.check(&ctx).map_err(|source| Error::Kernel {
        method: spec.name,
        tensor: out_name.to_string(),
        pass: None,
        source,
    })?;
    Ok(job)
}

/// The job of a non-float tensor (a BOOL mask, integer ids): not merged, but copied from the
/// base model (else the first), as mergekit carries them through. Every input must have its
/// dtype and shape; the worker checks that they hold the same bytes too.
pub(super) fn copy_job(
    cx: &Ctx,
    out_name: &str,
    mut inputs: Vec<InputPlan>,
    from: usize,
) -> Result<TensorPlan> {
    let first = &inputs[from];
    if inputs
        .iter()
        .any(|i| i.dtype != first.dtype || i.shape != first.shape)
    {
        let what: Vec<String> = inputs
            .iter()
            .map(|i| format!("{} has {} {:?}", i.model, i.dtype.name(), i.shape))
            .collect();
        return Err(Error::plan(out_name, format!("non-float tensors are copied from the base model, not merged, so every model must have it with one dtype and shape, but {}", what.join(", "))));
    }
    // the model it is copied from first: the worker copies the first and compares the rest
    let src = inputs.remove(from);
    inputs.insert(0, src);
    Ok(TensorPlan {
        name: out_name.to_string(),
        shape: inputs[0].shape.clone(),
        out_dtype: inputs[0].dtype,
        method: copy_method()?,
        params: Arc::default(),
        model_params: vec![Arc::default(); inputs.len()],
        inputs,
        base: None,
        seed: cx.seed,
        rng: cx.rng,
        work_dtype: None,
        compute: Work::F32,
        row_map: None,
        passes: 0,
    })
}

/// The method copied tensors name.
fn copy_method() -> Result<&'static dyn Method> {
    kernels::method(COPY_METHOD).ok_or_else(|| {
        Error::input(
            "",
            format!("the copy method {COPY_METHOD} is not registered"),
        )
    })
}

/// Gives a copy job the recipe's parameters for the tensor, in the copy's input order (the
/// source `from` first): the worker ignores them, `lay_out_draws` counts the random draws
/// mergekit spends merging such a tensor as floats.
fn keep_params(
    job: &mut TensorPlan,
    params: Arc<Params>,
    model_params: Vec<Arc<Params>>,
    base: Option<usize>,
    from: usize,
) {
    let order = |i: usize| match i {
        i if i == from => 0,
        i if i < from => i + 1,
        i => i,
    };
    let mut mp = vec![Arc::default(); model_params.len()];
    for (i, p) in model_params.into_iter().enumerate() {
        mp[order(i)] = p;
    }
    job.params = params;
    job.model_params = mp;
    job.base = base.map(order);
}

/// The method a copied (non-float) tensor's job names: it has no statistics passes and no
/// random draws.
pub const COPY_METHOD: &str = "passthrough";

/// The shape of an embedding re-mapped into the output vocabulary: its `rows`, and the
/// models' common row length (rows of different lengths can't be merged).
fn vocab_shape(
    name: &str,
    rows: u64,
    sources: &[Source],
    infos: &[&TensorInfo],
) -> Result<Vec<u64>> {
    let cols = infos[0].shape[1];
    if infos.iter().any(|i| i.shape[1] != cols) {
        let shapes: Vec<String> = sources
            .iter()
            .zip(infos)
            .map(|(s, i)| format!("{} has {:?}", s.model, i.shape))
            .collect();
        return Err(Error::plan(name, format!("the models' embedding widths differ ({}); rows of different hidden sizes can't be merged", shapes.join(", "))));
    }
    Ok(vec![rows, cols])
}

pub(super) fn out_shape(
    cx: &Ctx,
    name: &str,
    sources: &[Source],
    infos: &[&TensorInfo],
) -> Result<Vec<u64>> {
    let first = &infos[0].shape;
    if infos.iter().all(|i| &i.shape == first) {
        return Ok(first.clone());
    }
    let shapes: Vec<String> = sources
        .iter()
        .zip(infos)
        .map(|(s, i)| format!("{} has {:?}", s.model, i.shape))
        .collect();
    if cx.arch.is_embedding(name) && infos.iter().all(|i| i.shape.len() == 2) {
        // the largest common submatrix, as mergekit takes when told to truncate
        let rows = infos.iter().map(|i| i.shape[0]).min().unwrap_or(0);
        let cols = infos.iter().map(|i| i.shape[1]).min().unwrap_or(0);
        if cx.truncate_embeddings {
            return Ok(vec![rows, cols]);
        }
        return Err(Error::plan(name, format!("the models' vocabularies differ ({}): merging their rows as they are would mix up tokens. Align the vocabulary axes with the tokenizer configuration: set `tokenizer_source: union` (every model's tokens, each model's rows for its own tokens), `tokenizer_source: base` or a model, or a `tokenizer:` section (docs/tokenizers.md); or pass --unsafe-truncate-embeddings to keep only the first {rows} rows of every model", shapes.join(", "))));
    }
    Err(Error::input(
        "",
        format!("shape mismatch for tensor {name}: {}", shapes.join(", ")),
    ))
}

/// The inputs an output tensor reads, one per slice source (a tied embedding reads its
/// twin), with their header entries.
fn tensor_inputs<'a>(
    cx: &Ctx<'a>,
    s: &Slice,
    out_name: &str,
    in_names: &[String],
) -> Result<(Vec<InputPlan>, Vec<&'a TensorInfo>)> {
    let mut inputs = Vec::with_capacity(s.sources.len());
    let mut infos: Vec<&TensorInfo> = Vec::with_capacity(s.sources.len());
    for (pos, (src, in_name)) in s.sources.iter().zip(in_names).enumerate() {
        let m = &cx.models[&src.model];
        // a model with tied embeddings reads its input-side twin
        let in_name = match cx.arch.tied_to(in_name) {
            Some(twin) if !m.tensors.contains_key(in_name) => twin,
            _ => in_name.as_str(),
        };
        let (uri, info) = m.tensors.get(in_name).ok_or_else(|| {
            Error::input(
                "",
                format!(
                    "tensor {in_name} is missing from model {} ({}), but {out_name} needs it",
                    src.model,
                    m.loc.uri()
                ),
            )
        })?;
        let dt = match info.dtype {
            StDtype::Float(dt) => dt,
            StDtype::Other(n, _) => DType::from_st_name(n).ok_or_else(|| {
                Error::input(uri, format!("tensor {in_name} has dtype {n}, which can't be merged or copied (F32, F16 and BF16 merge; BOOL and integer tensors are copied from the base model)"))
            })?,
        };
        let mut input = InputPlan {
            uri: uri.clone(),
            data_offset: info.start,
            dtype: dt,
            shape: info.shape.clone(),
            model: cx.model_names[&src.model].clone(),
            // keyed by the model's position among the inputs, not by where it is stored, so
            // the same recipe over copies on S3 or local disk draws the same numbers
            model_key: rng::key_of(&format!("input:{pos}")),
            tensor: in_name.to_string(),
            rng_offset: 0,
            lora: None,
            derived: None,
        };
        if let Some(a) = &m.adapter {
            a.attach(in_name, &mut input);
        }
        inputs.push(input);
        infos.push(info);
    }
    Ok((inputs, infos))
}

/// The method's parameters resolved for this tensor, and each input model's.
fn job_params(
    cx: &Ctx,
    s: &Slice,
    out_name: &str,
    in_names: &[String],
    t: f64,
    base: Option<usize>,
) -> Result<(Arc<Params>, Vec<Arc<Params>>)> {
    let spec = cx.method.spec();
    let mut params = HashMap::new();
    for p in spec.params {
        let v = recipe::resolve(cx.recipe, s, p.name, None, out_name, t).or(p.default);
        match v {
            Some(v) => {
                params.insert(p.name.to_string(), v);
            }
            None => {
                return Err(Error::recipe("", format!(
                    "merge_method {} requires parameter `{}` (set it under `parameters:`), missing for tensor {out_name}",
                    spec.name, p.name
                )))
            }
        }
    }
    let mut model_params = Vec::with_capacity(s.sources.len());
    for (i, (src, in_name)) in s.sources.iter().zip(in_names).enumerate() {
        let mut mp = HashMap::new();
        for p in spec.tensor_params {
            match recipe::resolve(cx.recipe, s, p.name, Some(&src.model), in_name, t).or(p.default) {
                Some(v) => {
                    mp.insert(p.name.to_string(), v);
                }
                None if Some(i) == base => {}
                None => {
                    return Err(Error::recipe("", format!(
                        "merge_method {} requires parameter `{}` for model {} (missing for tensor {in_name})",
                        spec.name, p.name, src.model
                    )))
                }
            }
        }
        model_params.push(cx.params.intern(mp));
    }
    Ok((cx.params.intern(params), model_params))
}
