//! The planner's own types: what one output tensor is made from, with its dtypes and method
//! resolved. They never hold an unknown dtype or method; the wire message a worker receives
//! is built from them only where tasks are built (`job/tasks.rs`).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use shardmerge_proto as pb;
use shardmerge_worker::format::dtype::DType;
use shardmerge_worker::kernels::{rng, round::Work, Method, TensorCtx};
use shardmerge_worker::tensor::view2d;

use super::lora::LoraPlan;
use crate::error::{Error, Result};

/// Parameters by name, resolved for one tensor (booleans as 0/1).
pub type Params = HashMap<String, f64>;

/// A parameter map's names and values' bits, sorted: what two equal maps share.
type ParamsKey = Vec<(String, u64)>;

/// One copy of each distinct parameter map of a plan: a recipe resolves the same parameters
/// for most tensors and models, and a plan of many tensors (or one model listed thousands of
/// times) would otherwise hold a map per tensor and input.
#[derive(Default)]
pub struct Interner {
    seen: std::cell::RefCell<HashMap<ParamsKey, Arc<Params>>>,
}

impl Interner {
    /// The shared copy of `p`.
    pub fn intern(&self, p: Params) -> Arc<Params> {
        let mut key: ParamsKey = p.iter().map(|(k, v)| (k.clone(), v.to_bits())).collect();
        key.sort_unstable();
        self.seen
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| Arc::new(p))
            .clone()
    }
}

/// An input computed in the task instead of read: the tensor of an earlier stage of a
/// multi-stage recipe, streamed (see `plan::stages`). Two are equal when they are the same plan.
#[derive(Clone, Debug)]
pub struct Derived(pub Arc<TensorPlan>);

impl PartialEq for Derived {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// One input of a tensor: where its bytes lie and how they are stored.
#[derive(Clone, Debug, PartialEq)]
pub struct InputPlan {
    /// The file holding it (shared by every tensor of that file).
    pub uri: Arc<str>,
    /// Where its data starts in that file.
    pub data_offset: u64,
    pub dtype: DType,
    pub shape: Vec<u64>,
    /// The recipe's name of its model (shared by every tensor of that model).
    pub model: Arc<str>,
    /// The model's random-stream key (by position among the inputs).
    pub model_key: u64,
    /// Its name in the model.
    pub tensor: String,
    /// Its first draw in mergekit's seeded stream.
    pub rng_offset: u64,
    /// A LoRA adapter applied to it as it is read (`model+adapter`).
    pub lora: Option<Arc<LoraPlan>>,
    /// Computed in the task from an earlier stage's tensor instead of read from `uri` (which
    /// then names where that stage's checkpoint would lie, for messages).
    pub derived: Option<Derived>,
}

impl InputPlan {
    /// Whether `other` reads the same bytes: the same file, place, type, shape, adapter and
    /// stage, whatever the model's name or where its random draws start (a DARE point's
    /// inputs and a TIES point's, in a grid of methods).
    pub fn reads_as(&self, other: &InputPlan) -> bool {
        (
            &self.uri,
            self.data_offset,
            self.dtype,
            &self.shape,
            &self.tensor,
        ) == (
            &other.uri,
            other.data_offset,
            other.dtype,
            &other.shape,
            &other.tensor,
        ) && (&self.lora, &self.derived) == (&other.lora, &other.derived)
    }

    /// Bytes one of its rows takes in its file.
    pub fn row_bytes(&self) -> u64 {
        let (_, row_len) = view2d(&self.shape);
        row_len.saturating_mul(self.dtype.size() as u64)
    }

    /// The dtype the model holds it in (an adapter's copy of it is rounded to that).
    pub fn model_dtype(&self) -> DType {
        self.lora.as_ref().map_or(self.dtype, |l| l.merged)
    }
}

/// One output tensor, planned: its inputs, method and parameters resolved for it, its dtypes,
/// and the statistics passes its method runs over it.
#[derive(Clone)]
pub struct TensorPlan {
    pub name: String,
    pub shape: Vec<u64>,
    pub out_dtype: DType,
    /// The merge method, or the copy method for a non-float tensor ([`TensorPlan::is_copy`]).
    pub method: &'static dyn Method,
    /// Method-level parameters, resolved for this tensor (shared by the tensors that resolve
    /// them alike: see [`Interner`]).
    pub params: Arc<Params>,
    /// Per-input parameters, in input order (shared likewise).
    pub model_params: Vec<Arc<Params>>,
    pub inputs: Vec<InputPlan>,
    /// Which input is the base model.
    pub base: Option<usize>,
    pub seed: u64,
    pub rng: rng::Mode,
    /// The dtype mergekit loads the inputs in (the recipe's, else the base's); none for a copy.
    pub work_dtype: Option<DType>,
    /// What every operation rounds to (the recipe's 16-bit dtype; f32 otherwise).
    pub compute: Work,
    /// Output rows re-mapped by token (a vocabulary-aligned embedding).
    pub row_map: Option<pb::RowMap>,
    /// Statistics passes the method runs over the whole tensor before writing it.
    pub passes: u32,
}

impl fmt::Debug for TensorPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TensorPlan")
            .field("name", &self.name)
            .field("shape", &self.shape)
            .field("out_dtype", &self.out_dtype)
            .field("method", &self.method.spec().name)
            .field("inputs", &self.inputs)
            .field("base", &self.base)
            .field("passes", &self.passes)
            .finish_non_exhaustive()
    }
}

impl TensorPlan {
    /// Whether a task over rows of `other` reads what the same task over rows of this tensor
    /// reads: the same shape, output type and row map, and inputs that read the same bytes
    /// ([`InputPlan::reads_as`]), whatever the method or parameters.
    pub fn reads_as(&self, other: &TensorPlan) -> bool {
        (&self.shape, self.out_dtype, &self.row_map)
            == (&other.shape, other.out_dtype, &other.row_map)
            && self.inputs.len() == other.inputs.len()
            && self
                .inputs
                .iter()
                .zip(&other.inputs)
                .all(|(x, y)| x.reads_as(y))
    }

    /// The method's name (mergekit's).
    pub fn method_name(&self) -> &'static str {
        self.method.spec().name
    }

    /// Whether this tensor is copied (a non-float tensor) rather than merged.
    pub fn is_copy(&self) -> bool {
        !self.out_dtype.is_float()
    }

    /// Rows of its 2-D view and bytes per output row.
    pub fn rows(&self) -> (u64, u64) {
        let (rows, row_len) = view2d(&self.shape);
        (rows, row_len * self.out_dtype.size() as u64)
    }

    /// Input bytes one row reads, all inputs together: workers read whole input rows (an input
    /// wider than the output, such as an embedding with a larger hidden size, is read whole
    /// and cropped).
    pub fn input_row_bytes(&self) -> u64 {
        self.inputs
            .iter()
            .map(|s| match &s.derived {
                Some(d) => d.0.input_row_bytes(),
                None => s.row_bytes(),
            })
            .sum()
    }

    /// Input bytes of the whole tensor (each input byte once), LoRA factors included; a
    /// derived input's are those of the tensor it is computed from.
    pub fn input_bytes(&self) -> u64 {
        self.inputs
            .iter()
            .map(|s| {
                let own = match &s.derived {
                    Some(d) => d.0.input_bytes(),
                    None => s.shape.iter().product::<u64>() * s.dtype.size() as u64,
                };
                own + s.lora.as_ref().map_or(0, |l| l.bytes())
            })
            .sum()
    }

    /// Memory a task over some of its rows holds for its inputs' LoRA factors: (fixed, per
    /// row), see [`LoraPlan::memory`]; derived inputs' own inputs included.
    pub fn lora_memory(&self) -> (u64, u64) {
        self.inputs
            .iter()
            .flat_map(|s| {
                let own = s.lora.as_ref().map(|l| l.memory());
                own.into_iter()
                    .chain(s.derived.as_ref().map(|d| d.0.lora_memory()))
            })
            .fold((0, 0), |(f, r), (a, b)| (f + a, r + b))
    }

    /// Whether a task must hold all of its rows at once: its method has statistics passes, or
    /// an input is derived from a tensor that needs that (an earlier stage's statistics are
    /// computed in the task, over the whole tensor).
    pub fn needs_whole(&self) -> bool {
        self.passes > 0 || self.derived_whole()
    }

    /// Whether an input is derived from a tensor that must be computed whole: then this one
    /// cannot be cut into row ranges at all.
    pub fn derived_whole(&self) -> bool {
        self.inputs
            .iter()
            .any(|s| s.derived.as_ref().is_some_and(|d| d.0.needs_whole()))
    }

    /// The kernel's view of this tensor (as the worker builds it from the task).
    pub fn ctx(&self) -> Result<TensorCtx<'_>> {
        let (rows, row_len) = view2d(&self.shape);
        let row_len =
            usize::try_from(row_len).map_err(|_| Error::plan(&self.name, "row too large"))?;
        Ok(TensorCtx {
            name: &self.name,
            shape: &self.shape,
            rows,
            row_len,
            params: &self.params,
            model_params: self.model_params.iter().map(|p| &**p).collect(),
            base: self.base,
            model_keys: self.inputs.iter().map(|s| s.model_key).collect(),
            tensor_key: rng::key_of(&self.name),
            seed: self.seed,
            rng: self.rng,
            rng_offsets: self.inputs.iter().map(|s| s.rng_offset).collect(),
            work_bf16: self.work_dtype == Some(DType::BF16),
            work: self.compute,
        })
    }
}

/// A plan of tensor `name` for tests: method `method`, `n` f32 inputs of `shape` named as the
/// output, defaults for the method's parameters, no base.
#[cfg(test)]
pub(crate) fn test_tensor(name: &str, method: &str, shape: &[u64], n: usize) -> TensorPlan {
    let method = shardmerge_worker::kernels::method(method).expect("a registered method");
    let input = InputPlan {
        uri: "".into(),
        data_offset: 0,
        dtype: DType::F32,
        shape: shape.to_vec(),
        model: "".into(),
        model_key: 0,
        tensor: name.to_string(),
        rng_offset: 0,
        lora: None,
        derived: None,
    };
    TensorPlan {
        name: name.into(),
        shape: shape.to_vec(),
        out_dtype: DType::F32,
        method,
        params: Arc::new(
            method
                .spec()
                .params
                .iter()
                .filter_map(|p| p.default.map(|d| (p.name.to_string(), d)))
                .collect(),
        ),
        model_params: vec![Arc::default(); n],
        inputs: vec![input; n],
        base: None,
        seed: 0,
        rng: rng::Mode::Mergekit,
        work_dtype: Some(DType::F32),
        compute: Work::F32,
        row_map: None,
        passes: 0,
    }
}
