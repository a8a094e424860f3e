//! `shardmerge extract-lora`: mergekit-extract-lora's options, run in this process.

use std::time::Instant;

use regex::Regex;
use shardmerge_worker::storage::Resolver;

use crate::claim::Claim;
use crate::error::{Error, Result};
use crate::extract::{self, ExtractOptions, RunOptions};
use crate::{output, paths, size};

/// `shardmerge extract-lora`'s arguments (mergekit-extract-lora's names and defaults).
#[derive(clap::Args)]
pub(super) struct ExtractCmd {
    /// Output folder for the adapter: a local path, file:// or s3://bucket/prefix
    out: Option<String>,
    /// The output folder (mergekit's spelling; instead of OUT)
    #[arg(long, value_name = "OUT")]
    out_path: Option<String>,
    /// Fine-tuned model: a local folder, s3://bucket/prefix or a Hugging Face id org/name[@rev]
    #[arg(long)]
    model: String,
    /// Base model (the adapter applies to it)
    #[arg(long, alias = "base")]
    base_model: String,
    /// Largest rank of a module's factors
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    max_rank: u64,
    /// Split the singular values as sqrt(S) between lora_A and lora_B (the default)
    #[arg(long, overrides_with = "no_distribute_scale")]
    distribute_scale: bool,
    /// Put all of S into lora_A (lora_B = U)
    #[arg(long)]
    no_distribute_scale: bool,
    /// Factor embeddings too (lora_embedding_A/B; lm_head as a linear layer) instead of saving
    /// them whole in modules_to_save
    #[arg(long, overrides_with = "no_embed_lora")]
    embed_lora: bool,
    /// Save embeddings whole (the default)
    #[arg(long)]
    no_embed_lora: bool,
    /// Save this module (a name, or its last component) whole; repeatable
    #[arg(long = "save-module", value_name = "MODULE")]
    save_modules: Vec<String>,
    /// Leave out modules whose name matches this regular expression; repeatable
    #[arg(long = "exclude-regex", short = 'e', value_name = "REGEX")]
    exclude: Vec<String>,
    /// Factor only modules whose name matches one of these regular expressions; repeatable
    #[arg(long = "include-regex", short = 'i', value_name = "REGEX")]
    include: Vec<String>,
    /// Drop singular values at or below this (0: keep max-rank of them, however small)
    #[arg(long, default_value_t = 0.0)]
    sv_epsilon: f64,
    /// Leave out modules that cannot be factored (norms, ...) instead of saving them whole
    #[arg(long)]
    skip_undecomposable: bool,
    /// Modules factored at once (default: the number of cores)
    #[arg(long)]
    workers: Option<usize>,
    /// Memory the modules' tasks may hold at once (each holds its weight and task vector as
    /// f32, U, V and the SVD's workspace); a module that alone needs more is refused
    #[arg(long, default_value = "8GiB", value_parser = size::parse)]
    memory_limit: u64,
    /// Replace the adapter files OUT holds; without it an OUT that holds files is refused
    #[arg(long)]
    overwrite: bool,
    /// No summary line
    #[arg(long, short)]
    quiet: bool,
}

fn regexes(list: &[String], flag: &str) -> Result<Vec<Regex>> {
    list.iter()
        .map(|r| Regex::new(r).map_err(|e| Error::usage(flag, format!("{r}: {e}"))))
        .collect()
}

impl ExtractCmd {
    fn options(&self) -> Result<ExtractOptions> {
        Ok(ExtractOptions {
            max_rank: usize::try_from(self.max_rank).unwrap_or(usize::MAX),
            distribute_scale: !self.no_distribute_scale || self.distribute_scale,
            embed_lora: self.embed_lora && !self.no_embed_lora,
            save_modules: self.save_modules.clone(),
            exclude: regexes(&self.exclude, "--exclude-regex")?,
            include: regexes(&self.include, "--include-regex")?,
            sv_epsilon: self.sv_epsilon,
            skip_undecomposable: self.skip_undecomposable,
        })
    }

    fn out(&self) -> Result<&str> {
        match (&self.out, &self.out_path) {
            (Some(o), None) | (None, Some(o)) => Ok(o),
            (Some(_), Some(_)) => Err(Error::usage(
                "--out-path",
                "give the output folder once: as OUT or as --out-path",
            )),
            (None, None) => Err(Error::usage(
                "OUT",
                "the output folder is missing (OUT or --out-path)",
            )),
        }
    }

    pub(super) async fn run(&self, resolver: &Resolver) -> Result<()> {
        if !self.sv_epsilon.is_finite() || self.sv_epsilon < 0.0 {
            return Err(Error::usage(
                "--sv-epsilon",
                format!("{} is not a finite number >= 0", self.sv_epsilon),
            ));
        }
        let o = self.options()?;
        let cwd = paths::cwd();
        let start = Instant::now();
        let out = resolver.resolve(self.out()?, &cwd)?;
        let mut plan = extract::plan(&self.model, &self.base_model, &o, resolver, &cwd).await?;
        output::check_overlap_models(&[&plan.ft, &plan.base], &out)?;
        let job = format!("extract-lora-{}", std::process::id());
        let claim = Claim::take(&out, &job, self.overwrite, None).await?;
        let ran = async {
            output::check_held(&out, self.overwrite).await?;
            for n in &plan.notes {
                tracing::warn!("{n}");
            }
            let ro = RunOptions {
                workers: self
                    .workers
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
                memory_limit: self.memory_limit,
                base_name: self.base_model.clone(),
                ft_name: self.model.clone(),
                invocation: std::env::args().collect::<Vec<_>>().join(" "),
            };
            extract::run(&mut plan, &out, &ro, resolver).await
        }
        .await;
        claim.release().await;
        let x = ran?;
        if !self.quiet {
            let lo = x.ranks.iter().map(|(_, r)| *r).min().unwrap_or(0);
            let hi = x.ranks.iter().map(|(_, r)| *r).max().unwrap_or(0);
            eprintln!(
                "extract-lora: {} modules factored (rank {lo}..{hi}), {} tensors saved whole, {} read, adapter {} in {:.1} s -> {}",
                x.ranks.len(),
                plan.saved.len(),
                size::human(x.bytes_read),
                size::human(x.adapter_bytes),
                start.elapsed().as_secs_f64(),
                out.uri()
            );
        }
        Ok(())
    }
}
