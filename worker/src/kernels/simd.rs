//! The vector width of the hot loops. A loop written once as an `#[inline(always)]` function
//! over slices is built three times by [`wide`]: for baseline x86-64 (SSE2, four f32 lanes),
//! with AVX2 (eight) and with AVX-512 (sixteen, with mask registers for the compares), and
//! each call runs the widest build the CPU has. Integer operations and IEEE float `+ - * /`
//! give the same bits at any width (Rust never fuses a multiply and an add on its own, and
//! the compiler does not reorder float sums), so every build computes the same results; the
//! tests run each build the CPU can run ([`levels`]).
//!
//! `SHARDMERGE_SIMD=base|avx2|avx512` caps the width (an operator's choice on CPUs where wide
//! vectors lower the clock); it never raises it past what the CPU has.

use std::sync::OnceLock;

/// What one build of a loop uses. Only [`level`] and [`levels`] make one, and only for what
/// the CPU has: a `Level` is the proof that its build may run here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Level(Tier);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    Base,
    Avx2,
    Avx512,
}

impl Level {
    /// Runs the AVX2 build.
    pub(crate) fn avx2(self) -> bool {
        self.0 == Tier::Avx2
    }

    /// Runs the AVX-512 build.
    pub(crate) fn avx512(self) -> bool {
        self.0 == Tier::Avx512
    }

    /// The name `SHARDMERGE_SIMD` takes.
    pub fn name(self) -> &'static str {
        match self.0 {
            Tier::Base => "base",
            Tier::Avx2 => "avx2",
            Tier::Avx512 => "avx512",
        }
    }
}

/// The widest tier this CPU runs.
fn detected() -> Tier {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx2")
            && has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512dq")
        {
            return Tier::Avx512;
        }
        if has!("avx2") {
            return Tier::Avx2;
        }
    }
    Tier::Base
}

/// The level the loops run at: the widest this CPU has, capped by `SHARDMERGE_SIMD`.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let cpu = detected();
        let cap = match std::env::var("SHARDMERGE_SIMD").ok().as_deref() {
            None | Some("") => cpu,
            Some("base") => Tier::Base,
            Some("avx2") => Tier::Avx2,
            Some("avx512") => Tier::Avx512,
            Some(other) => {
                tracing::warn!(
                    "SHARDMERGE_SIMD={other:?} is not one of base, avx2, avx512: ignored"
                );
                cpu
            }
        };
        Level(cpu.min(cap))
    })
}

/// Every level this CPU runs, narrowest first (for tests that compare the builds).
pub fn levels() -> Vec<Level> {
    let cpu = detected();
    [Tier::Base, Tier::Avx2, Tier::Avx512]
        .into_iter()
        .filter(|&t| t <= cpu)
        .map(Level)
        .collect()
}

/// Defines `fn NAME(level: Level, args...)` that runs `BODY(args...)` (an `#[inline(always)]`
/// function, so each build gets its own copy of the loop) built for `level`. Const generics
/// are passed on: `wide! { fn mix_wide<const K: u8>(x: &[f32]) => mix }`; a method is named
/// by its type, its receiver the first argument: `wide! { fn f(s: &mut Sum, x: &[f32]) =>
/// Sum::add }`.
macro_rules! wide {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident $(<$(const $cn:ident: $ct:ty),+>)?
            ($($arg:ident: $aty:ty),* $(,)?) $(-> $ret:ty)? => $($body:ident)::+
    ) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$(const $cn: $ct),+>)? (
            level: $crate::kernels::simd::Level,
            $($arg: $aty),*
        ) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2 $(<$(const $cn: $ct),+>)? ($($arg: $aty),*) $(-> $ret)? {
                    $($body)::+ $(::<$($cn),+>)? ($($arg),*)
                }
                #[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512dq")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512 $(<$(const $cn: $ct),+>)? ($($arg: $aty),*) $(-> $ret)? {
                    $($body)::+ $(::<$($cn),+>)? ($($arg),*)
                }
                if level.avx512() {
                    // SAFETY: a `Level` is made only for what the CPU has (simd::level and
                    // simd::levels detect it), and this one says AVX-512
                    return unsafe { avx512 $(::<$($cn),+>)? ($($arg),*) };
                }
                if level.avx2() {
                    // SAFETY: as above, for AVX2
                    return unsafe { avx2 $(::<$($cn),+>)? ($($arg),*) };
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = level;
            $($body)::+ $(::<$($cn),+>)? ($($arg),*)
        }
    };
}
pub(crate) use wide;

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(always)]
    fn scaled_sum<const K: u8>(xs: &[f32], k: f32) -> f32 {
        xs.iter().fold(f32::from(K), |a, &x| a + x * k)
    }

    wide! {
        /// The test loop in each build.
        fn scaled_sum_wide<const K: u8>(xs: &[f32], k: f32) -> f32 => scaled_sum
    }

    /// Each build the CPU runs gives the same bits (a float sum in order), and the levels
    /// are listed narrowest first, ending with the detected one.
    #[test]
    fn every_level_gives_the_same_bits() {
        let xs: Vec<f32> = (0..1001).map(|i| (i as f32).sin() * 1e3).collect();
        let want = scaled_sum::<3>(&xs, 0.3).to_bits();
        let ls = levels();
        assert_eq!(ls[0].name(), "base");
        assert!(ls.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(ls.last().map(|l| l.0), Some(detected()));
        for l in ls {
            assert_eq!(
                scaled_sum_wide::<3>(l, &xs, 0.3).to_bits(),
                want,
                "{}",
                l.name()
            );
        }
        assert!(level() <= Level(detected()));
    }
}
