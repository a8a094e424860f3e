//! What `plan` prints of a multi-stage recipe: one line per stage (its method, what becomes of
//! its checkpoint, the stages it uses), then each stage's plan.

use super::Role;
use crate::planinfo::PlanInfo;
use crate::recipe::stages::Stage;
use crate::recipe::Recipe;

/// One stage as `plan` shows it.
pub(super) struct Row<'a> {
    pub(super) stage: &'a Stage,
    pub(super) role: Role,
    /// Why an intermediate is written rather than streamed.
    pub(super) why: Option<&'a str>,
    pub(super) out: &'a str,
    /// Its plan; none when it is planned only when it runs.
    pub(super) info: Option<&'a PlanInfo>,
}

impl Row<'_> {
    /// What becomes of its checkpoint, and where it goes.
    fn fate(&self) -> (&'static str, String) {
        match self.role {
            Role::Final => ("final output", "OUT".into()),
            Role::Output => ("output", self.out.into()),
            Role::Kept => ("intermediate, kept", self.out.into()),
            Role::Scratch => (
                "intermediate",
                match self.why {
                    Some(w) => format!("a scratch folder, removed at the end (written: {w})"),
                    None => "a scratch folder, removed at the end".into(),
                },
            ),
            Role::Streamed => (
                "streamed",
                "computed in the final stage's tasks, never written".into(),
            ),
        }
    }

    fn method(&self) -> String {
        let r = self.info.map(|i| i.plan.recipe.merge_method.clone());
        r.unwrap_or_else(|| {
            Recipe::parse(&self.stage.raw_text()).map_or(String::new(), |r| r.merge_method)
        })
    }
}

pub(super) fn text(rows: &[Row<'_>], skipped: &[(&Stage, &str)]) -> String {
    let mut out = format!("stages       {} to run, in this order\n", rows.len());
    for (k, r) in rows.iter().enumerate() {
        let (what, to) = r.fate();
        let uses: Vec<String> = r.stage.deps.iter().map(|d| format!("`{d}`")).collect();
        let uses = if uses.is_empty() {
            String::new()
        } else {
            format!("; uses {}", uses.join(", "))
        };
        out += &format!(
            "stage {:<6} {}: {}, {what} -> {to}{uses}\n",
            k + 1,
            r.stage.label(),
            r.method()
        );
    }
    for (s, why) in skipped {
        out += &format!("not run      {}: {why}\n", s.label());
    }
    for r in rows {
        out += &format!("\n{}:\n", r.stage.label());
        out += &match r.info {
            Some(i) => i.to_text(),
            None => "planned when it runs (its tokenizer settings read a stage not written yet)\n"
                .into(),
        };
    }
    out
}

pub(super) fn json(rows: &[Row<'_>], skipped: &[(&Stage, &str)]) -> String {
    let stages: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let (what, to) = r.fate();
            serde_json::json!({
                "name": r.stage.name, "merge_method": r.method(), "role": what, "out": to,
                "uses": r.stage.deps, "recipe": r.stage.raw_text(), "written_because": r.why,
                "plan": r.info.map(PlanInfo::to_json),
            })
        })
        .collect();
    let not_run: Vec<serde_json::Value> = skipped
        .iter()
        .map(|(s, why)| serde_json::json!({"name": s.name, "why": why}))
        .collect();
    let j = serde_json::json!({"stages": stages, "not_run": not_run});
    format!("{}\n", serde_json::to_string_pretty(&j).unwrap_or_default())
}
