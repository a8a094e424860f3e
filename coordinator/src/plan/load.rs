//! Reading a model from its config, index and safetensors headers (range reads only).

use super::*;

pub(crate) async fn read_header(loc: &Location) -> Result<st::Header> {
    let uri = loc.uri();
    let size = retry(|| loc.store.size(&loc.path)).await.map_err(|e| {
        if e.not_found {
            Error::input(&uri, "file not found")
        } else {
            Error::input(&uri, format!("{e}"))
        }
    })?;
    let prefix = retry(|| loc.store.read_range(&loc.path, 0..size.min(8)))
        .await
        .map_err(|e| Error::input(&uri, format!("{e}")))?;
    let n = st::header_len(&prefix, size).map_err(|e| Error::input(&uri, format!("{e}")))?;
    let json = retry(|| loc.store.read_range(&loc.path, 8..8 + n))
        .await
        .map_err(|e| Error::input(&uri, format!("{e}")))?;
    st::parse_header(&json, size).map_err(|e| Error::input(&uri, format!("{e}")))
}

pub(super) async fn read_json(loc: &Location) -> Result<Option<Value>> {
    match retry(|| loc.store.read_all(&loc.path)).await {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::input(loc.uri(), format!("not valid JSON: {e}"))),
        Err(e) if e.not_found => Ok(None),
        Err(e) => Err(Error::input(loc.uri(), format!("{e}"))),
    }
}

/// Reads and checks a model folder's `model.safetensors.index.json`, if it has one.
pub(super) async fn read_index(loc: &Location) -> Result<Option<st_index::Index>> {
    let iloc = loc.join(names::INDEX);
    match retry(|| iloc.store.read_all(&iloc.path)).await {
        Ok(b) => st_index::parse_index(&b)
            .map(Some)
            .map_err(|e| Error::input(iloc.uri(), e.to_string())),
        Err(e) if e.not_found => Ok(None),
        Err(e) => Err(Error::input(iloc.uri(), format!("{e}"))),
    }
}

/// Reads a model folder's config, index and headers (never the tensor data).
pub async fn load_model(resolver: &Resolver, base_dir: &Path, name: &str) -> Result<ModelInfo> {
    // `org/name[@rev]` that is no local path is a Hugging Face repository (`hf://`)
    let reference = shardmerge_worker::storage::hub::model_reference(name, base_dir);
    let loc = resolver.resolve(&reference, base_dir)?;
    let config = read_json(&loc.join(names::CONFIG)).await?;
    let index = read_index(&loc).await?;
    let files: Vec<String> = match &index {
        Some(idx) => idx.files.clone(),
        None => vec![single_file(&loc).await?],
    };
    let mut tensors = BTreeMap::new();
    let mut bytes = 0;
    for f in &files {
        let floc = loc.join(f);
        let h = read_header(&floc).await?;
        bytes += h.tensors.values().map(|t| t.end - t.start).sum::<u64>();
        let uri: std::sync::Arc<str> = floc.uri().into();
        for (n, t) in h.tensors {
            if let Some((other, _)) = tensors.get(&n) {
                return Err(Error::input(
                    loc.uri(),
                    format!("tensor {n} is in two files, {other} and {uri}"),
                ));
            }
            tensors.insert(n, (uri.clone(), t));
        }
        let max = st::max_tensors();
        if tensors.len() > max {
            return Err(Error::input(loc.uri(), format!("more than {max} tensors in one checkpoint (set SHARDMERGE_MAX_TENSORS to raise the limit)")));
        }
    }
    if let Some(idx) = &index {
        check_index(&loc, idx, &tensors)?;
    }
    let arch = arch::of_config(config.as_ref());
    let num_layers = count_layers(&loc, arch, config.as_ref(), &tensors)?;
    Ok(ModelInfo {
        name: name.to_string(),
        loc,
        config,
        tensors: std::sync::Arc::new(tensors),
        arch,
        num_layers,
        bytes,
        adapter: None,
    })
}

/// The one data file of a model folder without an index, or why the folder is no checkpoint.
async fn single_file(loc: &Location) -> Result<String> {
    let single = loc.join(names::SINGLE_FILE);
    if !single.store.exists(&single.path).await? {
        let what = if loc.store.exists(&loc.path).await? || !loc.store.is_local() {
            "has no model.safetensors or model.safetensors.index.json (is it a Hugging Face safetensors checkpoint?)"
        } else {
            "does not exist"
        };
        return Err(Error::input(
            "",
            format!("model folder {} {what}", loc.uri()),
        ));
    }
    Ok(names::SINGLE_FILE.into())
}

/// Every tensor the index places is in the header of the file it names.
fn check_index(
    loc: &Location,
    idx: &st_index::Index,
    tensors: &BTreeMap<String, (std::sync::Arc<str>, TensorInfo)>,
) -> Result<()> {
    for (tname, file) in &idx.weight_map {
        match tensors.get(tname) {
            Some((uri, _)) if uri.ends_with(&format!("/{file}")) => {}
            _ => {
                return Err(Error::input(loc.uri(), format!("the index puts tensor {tname} in {file}, but that file's header doesn't have it")))
            }
        }
    }
    Ok(())
}

/// The model's layer count: what its config says, or more if its tensor names say so.
fn count_layers(
    loc: &Location,
    arch: &Arch,
    config: Option<&Value>,
    tensors: &BTreeMap<String, (std::sync::Arc<str>, TensorInfo)>,
) -> Result<u64> {
    let from_names = tensors
        .keys()
        .filter_map(|n| arch.split_layer(n).map(|(_, i, _)| i + 1))
        .max()
        .unwrap_or(0);
    let num_layers = arch
        .config_layers(config)
        .unwrap_or(from_names)
        .max(from_names);
    // every layer is planned (and a config can claim any number): bounded like the tensors
    if num_layers > st::max_tensors() as u64 {
        return Err(Error::input(loc.uri(), format!("config.json claims {num_layers} layers, more than the {} tensors a checkpoint may hold", st::max_tensors())));
    }
    Ok(num_layers)
}

/// The checkpoint `plan` writes at `loc`, as the input `name` of a later plan (a stage of a
/// multi-stage recipe planned before the stage it uses is written): its config, tensors and
/// offsets are all known from the plan.
pub fn planned_model(name: &str, loc: Location, plan: &Plan) -> ModelInfo {
    let mut tensors = BTreeMap::new();
    for f in &plan.files {
        let uri: std::sync::Arc<str> = loc.join(&f.name).uri().into();
        for (&ti, &(start, end)) in f.tensors.iter().zip(&f.layout.spans) {
            let t = &plan.tensors[ti];
            let dtype = match t.out_dtype {
                dt @ (DType::F32 | DType::F16 | DType::BF16) => StDtype::Float(dt),
                dt => StDtype::Other(dt.name(), dt.size()),
            };
            let info = TensorInfo {
                dtype,
                shape: t.shape.clone(),
                start,
                end,
            };
            tensors.insert(t.name.clone(), (uri.clone(), info));
        }
    }
    ModelInfo {
        name: name.to_string(),
        loc,
        config: plan.config.clone(),
        arch: plan.arch,
        num_layers: plan.out_layers,
        bytes: tensors_bytes(&tensors),
        tensors: std::sync::Arc::new(tensors),
        adapter: None,
    }
}

fn tensors_bytes(tensors: &BTreeMap<String, (std::sync::Arc<str>, TensorInfo)>) -> u64 {
    tensors.values().map(|(_, t)| t.end - t.start).sum()
}
