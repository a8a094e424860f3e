use super::*;

const TWO: &str = "\
merge_method: task_arithmetic
base_model: base
models:
  - model: langs
    parameters: {weight: 1.0}
  - model: instruct+adapter
---
name: langs
merge_method: ties
base_model: base
models:
  - model: eu
  - model: ca
";

fn names(s: &Stages) -> Vec<Option<&str>> {
    s.stages.iter().map(|s| s.name.as_deref()).collect()
}

#[test]
fn one_recipe_is_no_stages() {
    assert!(split("merge_method: linear\nmodels: [{model: a}]\n")
        .unwrap()
        .is_none());
    // a leading `---` and a trailing one make one document
    assert!(split("---\nname: x\nmerge_method: linear\n---\n")
        .unwrap()
        .is_none());
}

#[test]
fn stages_run_after_the_stages_they_name() {
    let s = split(TWO).unwrap().unwrap();
    assert_eq!(names(&s), [Some("langs"), None]);
    let fin = s.final_stage().unwrap();
    assert_eq!(fin.deps, ["langs"]);
    let text = fin.text(&|n| format!("/tmp/x/{n}"));
    let v: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(v["models"][0]["model"], "/tmp/x/langs");
    assert_eq!(v["base_model"], "base");
    // not a stage: left alone, `+adapter` too
    assert_eq!(v["models"][1]["model"], "instruct+adapter");
    assert!(v.get("name").is_none());
    assert_eq!(s.needed_for(fin).len(), 2);
}

#[test]
fn every_model_place_is_a_reference() {
    let t = "\
name: a
merge_method: linear
models: [{model: m}]
---
merge_method: passthrough
slices:
  - sources: [{model: a+lora, layer_range: [0, 2]}]
    base_model: a
tokenizer:
  source: a
  tokens:
    x: {source: a}
    y: {source: {kind: model_token, model: a, token_id: 3}}
    z: {source: {kind: zero}}
";
    let s = split(t).unwrap().unwrap();
    let text = s.final_stage().unwrap().text(&|n| format!("S/{n}"));
    let v: Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(v["slices"][0]["sources"][0]["model"], "S/a+lora");
    assert_eq!(v["slices"][0]["base_model"], "S/a");
    assert_eq!(v["tokenizer"]["source"], "S/a");
    assert_eq!(v["tokenizer"]["tokens"]["x"]["source"], "S/a");
    assert_eq!(v["tokenizer"]["tokens"]["y"]["source"]["model"], "S/a");
    assert_eq!(v["tokenizer"]["tokens"]["z"]["source"]["kind"], "zero");
}

#[test]
fn order_is_by_dependency_then_file_order() {
    let t = "name: c\nmerge_method: linear\nmodels: [{model: b}, {model: a}]\n---\n\
             name: a\nmerge_method: linear\nmodels: [{model: m}]\n---\n\
             name: b\nmerge_method: linear\nmodels: [{model: a}]\n---\n\
             name: d\nmerge_method: linear\nmodels: [{model: m}]\n";
    let s = split(t).unwrap().unwrap();
    assert_eq!(names(&s), [Some("a"), Some("b"), Some("c"), Some("d")]);
    assert!(s.final_stage().is_none());
    let c = s.get("c").unwrap();
    let need: Vec<_> = s.needed_for(c).iter().map(|s| s.name.clone()).collect();
    assert_eq!(need, [Some("a".into()), Some("b".into()), Some("c".into())]);
}

#[test]
fn bad_files_are_errors_naming_the_stage() {
    let err = |t: &str| split(t).unwrap_err().to_string();
    let e = err("name: a\nmerge_method: linear\nmodels: [{model: b}]\n---\n\
                 name: b\nmerge_method: linear\nmodels: [{model: a}]\n");
    assert!(
        e.contains("cycle") && e.contains("`a` -> `b` -> `a`"),
        "{e}"
    );
    let e = err("name: a\nmerge_method: linear\nmodels: [{model: a}]\n---\nmerge_method: linear\nmodels: [{model: a}]\n");
    assert!(e.contains("stage `a`") && e.contains("`a` -> `a`"), "{e}");
    let e = err("name: a\nmerge_method: linear\nmodels: [{model: m}]\n---\n\
                 name: a\nmerge_method: linear\nmodels: [{model: m}]\n");
    assert!(e.contains("stage `a`") && e.contains("unique"), "{e}");
    let e = err("merge_method: linear\nmodels: [{model: m}]\n---\nmerge_method: linear\nmodels: [{model: m}]\n");
    assert!(
        e.contains("recipes 1 and 2") && e.contains("unnamed"),
        "{e}"
    );
    let e = err("name: ../x\nmerge_method: linear\n---\nmerge_method: linear\n");
    assert!(e.contains("`../x` is not usable as a stage name"), "{e}");
    let e = err("name: 3\nmerge_method: linear\n---\nmerge_method: linear\n");
    assert!(e.contains("recipe 1 of the file.name"), "{e}");
    let e = err("- a\n---\nmerge_method: linear\n");
    assert!(
        e.contains("recipe 1 of the file") && e.contains("mapping"),
        "{e}"
    );
}

#[test]
fn malformed_yaml_is_an_error_not_a_hang() {
    let e = crate::recipe::Recipe::parse("merge_method: [ties\nmodels: {").unwrap_err();
    assert!(e.to_string().contains("not valid YAML"), "{e}");
    let e = split("a: [\n---\nb: 1\n").unwrap_err();
    assert!(e.to_string().contains("not valid YAML"), "{e}");
    let e = crate::recipe::Recipe::parse("merge_method: linear\n---\nmerge_method: ties\n")
        .unwrap_err();
    assert!(e.to_string().contains("multi-stage"), "{e}");
}
