//! Merge kernels: pure functions over f32 slices, one file per method.
//!
//! A kernel sees one output tensor at a time as a 2-D array (rows = first dimension, a row =
//! the product of the others; a 1-D tensor is one row) and is handed a *row range* of it: one
//! f32 slice per input model covering exactly those rows, and an output slice of the same
//! length. Kernels never do I/O.
//!
//! Methods that need whole-tensor statistics declare `passes() > 0`. For each pass every row
//! range computes a `partial`, and `reduce` folds the partials of all ranges (in range order)
//! into the state that the next pass and finally `apply` read. A tensor that fits in one task
//! runs the same passes over a single range, so a tensor gives the same bits whether it was cut
//! or not, as long as `reduce` is exact (see [`stats`]).
//!
//! Adding a method: one file here implementing [`Method`], plus one line in [`registry`].

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

pub mod dot;
mod error;
pub mod exact;
pub mod mt;
pub mod rng;
pub mod round;
pub mod select;
pub mod simd;
pub mod stats;
pub mod stored;

pub use error::KernelError;
/// The share of a whole tensor's elements that its one walk over inputs as stored may note (the planner charges its working space by it).
pub use gta::NOTED_SHARE;

mod arcee_fusion;
#[cfg(test)]
mod degenerate;
mod gta;
mod karcher;
mod linear;
pub mod lora;
pub mod lowrank;
mod model_stock;
mod multislerp;
mod nearswap;
mod nuslerp;
mod passthrough;
mod ram;
mod registry;
pub mod report;
mod sce;
mod slerp;

pub use registry::{method, registry, task_method};
pub use stats::Stats;
pub use stored::Stored;

/// Whether a method takes a base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseRule {
    /// The method needs `base_model`.
    Required,
    /// The method uses `base_model` when given.
    Optional,
    /// The method has no notion of a base model (mergekit ignores one if given).
    Ignored,
}

/// The type of a parameter's values, declared once with the method: the planner checks every
/// value a recipe gives against it (naming the method and the recipe key), and
/// `docs/methods.md` is checked against it by a test. On the wire and in [`TensorCtx`] every
/// value is an f64 (a boolean 0 or 1; read it with [`TensorCtx::flag`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamType {
    /// A finite number in `[min, max]` (infinite bounds: none).
    Number { min: f64, max: f64 },
    /// A whole number in `[min, max]`.
    Int { min: f64, max: f64 },
    /// `true` or `false` (a recipe may also write 1 or 0).
    Bool,
}

impl ParamType {
    /// Why `v` is not a value of this type (`must be in [0, 1], got 2`), or `None` when it is.
    pub fn refuse(&self, v: f64) -> Option<String> {
        let (ok, what) = match *self {
            ParamType::Number { min, max } => ((min..=max).contains(&v), range(min, max)),
            ParamType::Int { min, max } => (
                (min..=max).contains(&v) && v.fract() == 0.0,
                format!(" an integer{}", range(min, max)),
            ),
            ParamType::Bool => (v == 0.0 || v == 1.0, " a boolean (true or false)".into()),
        };
        (!ok).then(|| format!("must be{what}, got {v}"))
    }
}

/// ` in [min, max]`, ` >= min`, ` <= max`, or nothing for no bounds.
fn range(min: f64, max: f64) -> String {
    match (min, max) {
        (f64::NEG_INFINITY, f64::INFINITY) => String::new(),
        (min, f64::INFINITY) => format!(" >= {min}"),
        (f64::NEG_INFINITY, max) => format!(" <= {max}"),
        (min, max) => format!(" in [{min}, {max}]"),
    }
}

/// As `docs/methods.md` names it: `number`, `number in [0, 1]`, `integer >= 0`, `boolean`.
impl fmt::Display for ParamType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ParamType::Number { min, max } => write!(f, "number{}", range(min, max)),
            ParamType::Int { min, max } => write!(f, "integer{}", range(min, max)),
            ParamType::Bool => f.write_str("boolean"),
        }
    }
}

/// A parameter a method reads, with mergekit's name and default, and the type of its values.
#[derive(Clone, Copy, Debug)]
pub struct ParamDef {
    pub name: &'static str,
    /// `None`: required (for a tensor parameter: required of every model but the base).
    /// `Some(NaN)`: optional, unset unless the recipe sets it.
    pub default: Option<f64>,
    pub ty: ParamType,
}

const ANY: ParamType = ParamType::Number {
    min: f64::NEG_INFINITY,
    max: f64::INFINITY,
};

impl ParamDef {
    /// A required number.
    pub const fn required(name: &'static str) -> ParamDef {
        ParamDef {
            name,
            default: None,
            ty: ANY,
        }
    }
    /// A number with a default.
    pub const fn with_default(name: &'static str, default: f64) -> ParamDef {
        ParamDef {
            name,
            default: Some(default),
            ty: ANY,
        }
    }
    /// A number with no default: unset (NaN to the kernel) unless the recipe sets it.
    pub const fn optional(name: &'static str) -> ParamDef {
        ParamDef::with_default(name, f64::NAN)
    }
    /// A boolean with a default.
    pub const fn flag(name: &'static str, default: bool) -> ParamDef {
        ParamDef {
            name,
            default: Some(if default { 1.0 } else { 0.0 }),
            ty: ParamType::Bool,
        }
    }
    /// An integer in `[min, max]` with a default.
    pub const fn int(name: &'static str, default: f64, min: f64, max: f64) -> ParamDef {
        ParamDef {
            name,
            default: Some(default),
            ty: ParamType::Int { min, max },
        }
    }
    /// This number, limited to `[min, max]`.
    pub const fn within(self, min: f64, max: f64) -> ParamDef {
        ParamDef {
            ty: ParamType::Number { min, max },
            ..self
        }
    }
    /// This number, at least `min`.
    pub const fn at_least(self, min: f64) -> ParamDef {
        self.within(min, f64::INFINITY)
    }
}

/// What a method accepts, for the planner and the docs.
#[derive(Clone, Copy, Debug)]
pub struct MethodSpec {
    pub name: &'static str,
    /// Method-level parameters (one value per tensor).
    pub params: &'static [ParamDef],
    /// Per-model parameters.
    pub tensor_params: &'static [ParamDef],
    pub base: BaseRule,
    /// Fewest and most input models, base included (`None`: no upper limit).
    pub min_models: usize,
    pub max_models: Option<usize>,
}

pub type KResult<T> = Result<T, KernelError>;

/// One output tensor as a kernel sees it.
#[derive(Clone, Debug)]
pub struct TensorCtx<'a> {
    pub name: &'a str,
    pub shape: &'a [u64],
    /// The 2-D view: `rows` rows of `row_len` elements.
    pub rows: u64,
    pub row_len: usize,
    /// Method-level parameters, resolved for this tensor (booleans as 0/1).
    pub params: &'a HashMap<String, f64>,
    /// Per-input parameters, in input order.
    pub model_params: Vec<&'a HashMap<String, f64>>,
    /// Which input is the base model, if any.
    pub base: Option<usize>,
    /// Per-input RNG keys and the tensor's key; the job's seed.
    pub model_keys: Vec<u64>,
    pub tensor_key: u64,
    pub seed: u64,
    /// The generator of random draws, and ([`rng::Mode::Mergekit`]) each input's position in
    /// the seeded stream for this tensor.
    pub rng: rng::Mode,
    pub rng_offsets: Vec<u64>,
    /// mergekit would compute this tensor in bfloat16 (its keep probabilities are rounded).
    pub work_bf16: bool,
    /// The dtype the arithmetic rounds to after every operation (the recipe's `dtype` unless
    /// f32 compute was asked for); see [`round`].
    pub work: round::Work,
}

impl TensorCtx<'_> {
    pub fn numel(&self) -> u64 {
        self.rows * self.row_len as u64
    }

    pub fn n_models(&self) -> usize {
        self.model_params.len()
    }

    /// A method-level parameter (the planner has filled in defaults).
    pub fn param(&self, name: &str) -> KResult<f64> {
        self.params.get(name).copied().ok_or_else(|| {
            KernelError::Missing(format!("tensor {}: parameter {name} is missing", self.name))
        })
    }

    /// A boolean method-level parameter (0 or 1 on the wire).
    pub fn flag(&self, name: &str) -> KResult<bool> {
        Ok(self.param(name)? != 0.0)
    }

    /// A per-model parameter of input `i`.
    pub fn model_param(&self, i: usize, name: &str) -> KResult<f64> {
        self.model_params
            .get(i)
            .and_then(|m| m.get(name))
            .copied()
            .ok_or_else(|| {
                KernelError::Missing(format!(
                    "tensor {}: parameter {name} is missing for input {i}",
                    self.name
                ))
            })
    }

    /// Like [`model_param`](Self::model_param), but `None` when unset.
    pub fn model_param_opt(&self, i: usize, name: &str) -> Option<f64> {
        self.model_params.get(i).and_then(|m| m.get(name)).copied()
    }

    /// The base input index, or an error naming the method.
    pub fn base_index(&self, method: &str) -> KResult<usize> {
        self.base
            .ok_or_else(|| KernelError::Missing(format!("{method} needs a base_model")))
    }

    /// Inputs other than the base, in order.
    pub fn others(&self) -> Vec<usize> {
        (0..self.n_models())
            .filter(|&i| Some(i) != self.base)
            .collect()
    }

    /// The counter-based RNG stream of input `i` for this tensor.
    pub fn stream(&self, i: usize) -> rng::Stream {
        rng::Stream::new(
            self.seed,
            self.tensor_key,
            self.model_keys.get(i).copied().unwrap_or(i as u64),
        )
    }

    /// Input `i`'s draws for this tensor, from element `first` on.
    pub fn draws(&self, i: usize, first: u64) -> rng::Draws {
        match self.rng {
            rng::Mode::Counter => rng::Draws::Counter {
                s: self.stream(i),
                next: first,
            },
            rng::Mode::Mergekit => {
                let at = self.rng_offsets.get(i).copied().unwrap_or(0);
                rng::Draws::Torch(Box::new(mt::Mt19937::at(self.seed, at + first)))
            }
        }
    }

    /// The keep probability mergekit compares draws with for a density `p`: `p` in the dtype
    /// it computes in (bfloat16, or float32 for every other dtype).
    pub fn keep_probability(&self, p: f64) -> f64 {
        if self.rng == rng::Mode::Mergekit && self.work_bf16 {
            rng::round_bf16(p)
        } else {
            p as f32 as f64
        }
    }
}

/// A row range of a tensor: rows `[start, end)`, the `index`-th range of the tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowRange {
    pub start: u64,
    pub end: u64,
    pub index: u32,
}

impl RowRange {
    /// Index of the range's first element in the flattened tensor.
    pub fn first_element(&self, ctx: &TensorCtx) -> u64 {
        self.start * ctx.row_len as u64
    }
}

/// What a reduction decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Reduced {
    /// Run the next pass with this state.
    More(Stats),
    /// No further pass is needed (an iteration converged); apply with this state.
    Done(Stats),
}

/// A merge method. See the module docs for the pass protocol.
pub trait Method: Send + Sync {
    fn spec(&self) -> &MethodSpec;

    /// Checks parameter values for one tensor; runs at plan time. The message should name the
    /// parameter and what range it must be in (the planner adds the method and tensor).
    fn check(&self, _ctx: &TensorCtx) -> KResult<()> {
        Ok(())
    }

    /// How many random draws each input makes for this tensor (by input position; empty or
    /// zeros for a deterministic method). The planner lays mergekit's draw stream out with it.
    fn draws(&self, _ctx: &TensorCtx) -> Vec<u64> {
        Vec::new()
    }

    /// How many statistics passes this tensor needs before `apply` (at most).
    fn passes(&self, _ctx: &TensorCtx) -> u32 {
        0
    }

    /// One range's partial statistics for `pass`, given the state reduced from earlier passes.
    fn partial(
        &self,
        _ctx: &TensorCtx,
        _pass: u32,
        _state: &Stats,
        _rows: RowRange,
        _inputs: &[&[f32]],
    ) -> KResult<Stats> {
        Err(KernelError::Internal(
            "this method has no statistics passes".into(),
        ))
    }

    /// Folds every range's partial (in range order) into the next state. The default is the
    /// usual one-pass reduction: merge the ranges' exact sums, keep their values, done.
    fn reduce(
        &self,
        _ctx: &TensorCtx,
        _pass: u32,
        _state: Stats,
        partials: Vec<Stats>,
    ) -> KResult<Reduced> {
        Ok(Reduced::Done(stats::sum_values(&partials)))
    }

    /// Computes the output rows. `inputs[i]` and `out` cover exactly `rows`.
    fn apply(
        &self,
        ctx: &TensorCtx,
        state: &Stats,
        rows: RowRange,
        inputs: &[&[f32]],
        out: &mut [f32],
    ) -> KResult<()>;

    /// [`Method::apply`] for several points of a sweep (each its own context, statistics and
    /// output; `outs[k]` is point `k`'s) over the same input rows: each output the same bits
    /// as `apply` would give it alone, with what every point computes alike (e.g. the task
    /// vectors) computed once. None: no such path for these points (the caller runs `apply`
    /// for each).
    fn apply_points(
        &self,
        _ctxs: &[TensorCtx],
        _states: &[Stats],
        _rows: RowRange,
        _inputs: &[&[f32]],
        _outs: &mut [&mut [f32]],
    ) -> Option<KResult<()>> {
        None
    }

    /// [`run_whole`] over a whole tensor whose inputs the method may overwrite (the caller
    /// drops them afterwards): the same output bits, with less work where the method can use
    /// its inputs as working memory. None: no such path (the caller runs [`run_whole`]); else
    /// whether every input value was finite (the caller can no longer look).
    fn whole_in_place(
        &self,
        _ctx: &TensorCtx,
        _inputs: &mut [&mut [f32]],
        _out: &mut [f32],
    ) -> Option<KResult<bool>> {
        None
    }

    /// Whether [`Method::whole_stored`] computes the whole of tensor `ctx` (its caller then
    /// hands it the inputs as stored instead of decoded).
    fn takes_stored(&self, _ctx: &TensorCtx) -> bool {
        false
    }

    /// [`run_whole`] over a whole tensor whose inputs come as stored ([`Stored`]), for a
    /// tensor [`Method::takes_stored`] accepts: the same output bits, reading less memory
    /// where the method walks its inputs several times. It calls `let_go(r)` as it goes, for
    /// elements `r` of every input that it will not read again soon (the caller may let their
    /// memory go, as long as it can give the same values again).
    fn whole_stored(
        &self,
        _ctx: &TensorCtx,
        _inputs: &[Stored],
        _out: &mut [f32],
        _let_go: &dyn Fn(Range<usize>),
    ) -> KResult<()> {
        Err(KernelError::Internal(
            "this method takes its inputs decoded, not as stored".into(),
        ))
    }
}

/// Runs every statistics pass over a whole tensor held in memory, then `apply`: the path for a
/// tensor that fits in one task. Uses the same partial/reduce steps as a cut tensor.
pub fn run_whole(
    m: &dyn Method,
    ctx: &TensorCtx,
    inputs: &[&[f32]],
    out: &mut [f32],
) -> KResult<()> {
    let whole = RowRange {
        start: 0,
        end: ctx.rows,
        index: 0,
    };
    let state = run_passes(m, ctx, |pass, state| {
        Ok(vec![m.partial(ctx, pass, state, whole, inputs)?])
    })?;
    m.apply(ctx, &state, whole, inputs, out)
}

/// Drives the pass protocol: `partials(pass, state)` computes the partials of every range for
/// a pass (in range order); returns the final state for `apply`.
pub fn run_passes(
    m: &dyn Method,
    ctx: &TensorCtx,
    mut partials: impl FnMut(u32, &Stats) -> KResult<Vec<Stats>>,
) -> KResult<Stats> {
    let mut state = Stats::default();
    for pass in 0..m.passes(ctx) {
        let ps = partials(pass, &state)?;
        match m.reduce(ctx, pass, state, ps)? {
            Reduced::More(s) => state = s,
            Reduced::Done(s) => return Ok(s),
        }
    }
    Ok(state)
}

#[cfg(test)]
#[allow(dead_code)] // helpers shared by every method's tests
pub(crate) mod testutil {
    //! Helpers for kernel unit tests: build a context and run a method whole or cut.
    use super::*;

    pub struct Case {
        pub name: String,
        pub shape: Vec<u64>,
        pub params: HashMap<String, f64>,
        pub model_params: Vec<HashMap<String, f64>>,
        pub base: Option<usize>,
        pub seed: u64,
        pub rng: rng::Mode,
        pub work_bf16: bool,
        pub work: round::Work,
    }

    impl Case {
        pub fn new(shape: &[u64], n_models: usize) -> Case {
            Case {
                name: "model.layers.0.mlp.up_proj.weight".into(),
                shape: shape.to_vec(),
                params: HashMap::new(),
                model_params: vec![HashMap::new(); n_models],
                base: None,
                seed: 0,
                rng: rng::Mode::default(),
                work_bf16: false,
                work: round::Work::F32,
            }
        }

        /// Fills in the method's defaults for unset parameters.
        pub fn with_defaults(mut self, m: &dyn Method) -> Case {
            for p in m.spec().params {
                if let Some(d) = p.default {
                    self.params.entry(p.name.into()).or_insert(d);
                }
            }
            for mp in &mut self.model_params {
                for p in m.spec().tensor_params {
                    if let Some(d) = p.default {
                        mp.entry(p.name.into()).or_insert(d);
                    }
                }
            }
            self
        }

        pub fn ctx(&self) -> TensorCtx<'_> {
            let (rows, row_len) = match self.shape.len() {
                0 => (1, 1),
                1 => (1, self.shape[0] as usize),
                _ => (
                    self.shape[0],
                    self.shape[1..].iter().product::<u64>() as usize,
                ),
            };
            TensorCtx {
                name: &self.name,
                shape: &self.shape,
                rows,
                row_len,
                params: &self.params,
                model_params: self.model_params.iter().collect(),
                base: self.base,
                model_keys: (0..self.model_params.len() as u64)
                    .map(|i| i * 7919 + 1)
                    .collect(),
                tensor_key: rng::key_of(&self.name),
                seed: self.seed,
                rng: self.rng,
                // each input's draws follow the previous input's, as mergekit's do
                rng_offsets: (0..self.model_params.len() as u64)
                    .map(|i| i * rows * row_len as u64)
                    .collect(),
                work_bf16: self.work_bf16,
                work: self.work,
            }
        }
    }

    /// Runs the method whole.
    pub fn run(m: &dyn Method, case: &Case, inputs: &[Vec<f32>]) -> Vec<f32> {
        let ctx = case.ctx();
        m.check(&ctx).unwrap();
        let refs: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
        let mut out = vec![0f32; ctx.numel() as usize];
        run_whole(m, &ctx, &refs, &mut out).unwrap();
        out
    }

    /// Runs the method with the tensor cut into ranges of `rows_per_range` rows, exactly as
    /// the coordinator would (a partial per range per pass, then apply per range).
    pub fn run_cut(
        m: &dyn Method,
        case: &Case,
        inputs: &[Vec<f32>],
        rows_per_range: u64,
    ) -> Vec<f32> {
        let ctx = case.ctx();
        let rl = ctx.row_len;
        let mut ranges = Vec::new();
        let mut s = 0;
        while s < ctx.rows {
            let e = (s + rows_per_range).min(ctx.rows);
            ranges.push(RowRange {
                start: s,
                end: e,
                index: ranges.len() as u32,
            });
            s = e;
        }
        let slice = |r: &RowRange| -> Vec<&[f32]> {
            inputs
                .iter()
                .map(|v| &v[r.start as usize * rl..r.end as usize * rl])
                .collect()
        };
        let state = run_passes(m, &ctx, |pass, state| {
            ranges
                .iter()
                .map(|r| m.partial(&ctx, pass, state, *r, &slice(r)))
                .collect()
        })
        .unwrap();
        // apply must write every element it is given: workers reuse their output buffers, so
        // what it does not write is the previous task's data (here NaN, to show)
        let mut out = vec![f32::NAN; ctx.numel() as usize];
        for r in &ranges {
            let o = &mut out[r.start as usize * rl..r.end as usize * rl];
            m.apply(&ctx, &state, *r, &slice(r), o).unwrap();
        }
        out
    }

    /// Deterministic pseudo-random test data.
    pub fn data(n: usize, salt: u64, scale: f32) -> Vec<f32> {
        let s = rng::Stream::new(salt, 1, 2);
        (0..n as u64)
            .map(|i| (s.uniform(i) as f32 * 2.0 - 1.0) * scale)
            .collect()
    }
}
