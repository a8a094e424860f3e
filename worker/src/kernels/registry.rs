//! The merge methods by mergekit name.

use super::*;

/// Every method, by mergekit name.
pub fn registry() -> &'static [&'static dyn Method] {
    static ALL: &[&dyn Method] = &[
        &linear::Linear,
        &gta::TASK_ARITHMETIC,
        &gta::TIES,
        &gta::DARE_LINEAR,
        &gta::DARE_TIES,
        &gta::BREADCRUMBS,
        &gta::BREADCRUMBS_TIES,
        &gta::DELLA,
        &gta::DELLA_LINEAR,
        &slerp::Slerp,
        &passthrough::Passthrough,
        &nearswap::NearSwap,
        &ram::Ram,
        &ram::RamPlusTl,
        &model_stock::ModelStock,
        &nuslerp::NuSlerp,
        &multislerp::MultiSlerp,
        &karcher::Karcher,
        &sce::Sce,
        &arcee_fusion::ArceeFusion,
    ];
    ALL
}

/// Looks a method up by its mergekit name.
pub fn method(name: &str) -> Option<&'static dyn Method> {
    registry().iter().copied().find(|m| m.spec().name == name)
}

/// Looks up what a task may name: a merge method, or the merge report's statistics
/// ([`report::NAME`]), which no recipe can name.
pub fn task_method(name: &str) -> Option<&'static dyn Method> {
    if name == report::NAME {
        return Some(&report::REPORT);
    }
    method(name)
}
