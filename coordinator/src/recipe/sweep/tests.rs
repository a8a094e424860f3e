use super::*;
use crate::recipe::Recipe;

fn names(s: &Sweep) -> Vec<&str> {
    s.points.iter().map(|p| p.name.as_str()).collect()
}

const GRID: &str = "merge_method: ties
base_model: models/instruct
parameters:
  density: {sweep: [0.3, 0.5]}
models:
- model: models/lang_eu
  parameters:
    weight: {sweep: [0.5, 0.75, 1.0]}
- model: models/instruct
";

#[test]
fn a_grid_is_the_product_with_named_points_that_are_ordinary_recipes() {
    let s = expand(GRID).unwrap().expect("a sweep");
    let labels: Vec<&str> = s.axes.iter().map(|a| a.label.as_str()).collect();
    assert_eq!(labels, ["density", "lang_eu.weight"]);
    assert_eq!(
        names(&s),
        [
            "density=0.3,lang_eu.weight=0.5",
            "density=0.3,lang_eu.weight=0.75",
            "density=0.3,lang_eu.weight=1",
            "density=0.5,lang_eu.weight=0.5",
            "density=0.5,lang_eu.weight=0.75",
            "density=0.5,lang_eu.weight=1",
        ]
    );
    for p in &s.points {
        assert!(!p.recipe.contains("sweep"), "{}", p.recipe);
        Recipe::parse(&p.recipe).unwrap_or_else(|e| panic!("{}: {e}\n{}", p.name, p.recipe));
    }
    let p = &s.points[4];
    let doc: Value = serde_yaml::from_str(&p.recipe).unwrap();
    assert_eq!(doc["parameters"]["density"].as_f64(), Some(0.5));
    assert_eq!(
        doc["models"][0]["parameters"]["weight"].as_f64(),
        Some(0.75)
    );
}

#[test]
fn an_ordinary_recipe_is_not_a_sweep() {
    let text =
        "merge_method: linear\nmodels:\n- model: models/sweeper\n  parameters: {weight: 1.0}\n";
    assert!(expand(text).unwrap().is_none());
    assert!(expand("merge_method: linear\n").unwrap().is_none());
}

#[test]
fn zip_pairs_the_lists_and_needs_one_length() {
    let zip = GRID.replace("[0.5, 0.75, 1.0]", "[0.5, 1.0]") + "sweep_mode: zip\n";
    let s = expand(&zip).unwrap().unwrap();
    assert_eq!(
        names(&s),
        [
            "density=0.3,lang_eu.weight=0.5",
            "density=0.5,lang_eu.weight=1"
        ]
    );
    let e = expand(&(GRID.to_string() + "sweep_mode: zip\n"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("one length") && e.contains("lang_eu.weight has 3"),
        "{e}"
    );
    let e = expand(&(GRID.to_string() + "sweep_mode: cross\n"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("sweep_mode") && e.contains("zip"), "{e}");
}

#[test]
fn methods_are_swept_with_sweep_methods() {
    let text = "sweep_methods: [task_arithmetic, ties]\nbase_model: models/instruct\n\
                models:\n- model: models/lang_eu\n  parameters: {weight: 1.0, density: 0.5}\n";
    let s = expand(text).unwrap().unwrap();
    assert_eq!(names(&s), ["method=task_arithmetic", "method=ties"]);
    let doc: Value = serde_yaml::from_str(&s.points[1].recipe).unwrap();
    assert_eq!(doc["merge_method"].as_str(), Some("ties"));
    assert!(doc.get("sweep_methods").is_none());
}

#[test]
fn labels_follow_slices_sources_filters_and_gradients() {
    let text = "merge_method: slerp
base_model: m/a
slices:
- sources:
  - model: m/a
    layer_range: [0, 2]
  - model: m/b
    layer_range: [0, 2]
    parameters:
      weight: {sweep: [1, 2]}
  parameters:
    t:
    - filter: self_attn
      value: {sweep: [0.1, 0.9]}
    - value: [0, {sweep: [0.4, 0.6]}, 1]
";
    let s = expand(text).unwrap().unwrap();
    let labels: Vec<&str> = s.axes.iter().map(|a| a.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "slices[0].b.weight",
            "slices[0].t[self_attn]",
            "slices[0].t[1][1]"
        ]
    );
    assert_eq!(s.points.len(), 8);
}

#[test]
fn sweeps_outside_parameters_and_bad_lists_are_refused() {
    let e = expand("merge_method: linear\nbase_model: {sweep: [a, b]}\n").unwrap_err();
    assert!(
        e.to_string().contains("only give a parameter's values"),
        "{e}"
    );
    let e = expand(&GRID.replace("[0.3, 0.5]", "[]")).unwrap_err();
    assert!(e.to_string().contains("at least one value"), "{e}");
    let e = expand(&GRID.replace("[0.3, 0.5]", "0.3")).unwrap_err();
    assert!(e.to_string().contains("must be a list"), "{e}");
    let e = expand(&GRID.replace("[0.3, 0.5]", "[[0.3]]")).unwrap_err();
    assert!(
        e.to_string().contains("number, a string or a boolean"),
        "{e}"
    );
    let e = expand("sweep_methods: ties\n").unwrap_err();
    assert!(e.to_string().contains("list of merge methods"), "{e}");
}

#[test]
fn two_settings_that_would_share_a_name_are_refused() {
    let text = "merge_method: linear
models:
- model: x/m
  parameters: {weight: {sweep: [1, 2]}}
- model: y/m
  parameters: {weight: {sweep: [1, 2]}}
";
    let e = expand(text).unwrap_err().to_string();
    assert!(e.contains("m.weight") && e.contains("distinct"), "{e}");
}

#[test]
fn a_grid_past_the_cap_is_refused_with_its_size() {
    let many: Vec<String> = (0..17).map(|i| format!("{}", i as f64 / 16.0)).collect();
    let list = format!("[{}]", many.join(", "));
    let text = GRID
        .replace("[0.3, 0.5]", &list)
        .replace("[0.5, 0.75, 1.0]", &list);
    let e = expand(&text).unwrap_err().to_string();
    assert!(
        e.contains("more than 256 points") && e.contains("density (17)"),
        "{e}"
    );
}

#[test]
fn points_are_selected_by_value() {
    let s = expand(GRID).unwrap().unwrap();
    let pick = |f: &[&str]| {
        let f: Vec<String> = f.iter().map(|x| x.to_string()).collect();
        s.select(&f)
            .map(|ps| ps.iter().map(|p| p.name.clone()).collect::<Vec<_>>())
    };
    assert_eq!(pick(&[]).unwrap().len(), 6);
    assert_eq!(
        pick(&["lang_eu.weight=1.0,density=0.5"]).unwrap(),
        ["density=0.5,lang_eu.weight=1"]
    );
    assert_eq!(
        pick(&["lang_eu.weight=0.75", "density=0.3"]).unwrap().len(),
        4
    );
    let e = pick(&["weight=1"]).unwrap_err().to_string();
    assert!(
        e.contains("no `weight`") && e.contains("lang_eu.weight"),
        "{e}"
    );
    let e = pick(&["density=0.4"]).unwrap_err().to_string();
    assert!(
        e.contains("no point matches") && e.contains("density=0.3,lang_eu.weight=0.5"),
        "{e}"
    );
    let e = pick(&["density"]).unwrap_err().to_string();
    assert!(e.contains("LABEL=VALUE"), "{e}");
}

#[test]
fn the_index_lists_points_with_values_and_recipes() {
    let s = expand(GRID).unwrap().unwrap();
    let done: Vec<&Point> = s.points.iter().take(2).collect();
    let j = s.index_json(&done);
    assert_eq!(j["sweep_mode"], "product");
    assert_eq!(j["axes"][1]["label"], "lang_eu.weight");
    assert_eq!(j["points"].as_array().unwrap().len(), 2);
    assert_eq!(j["points"][1]["values"]["lang_eu.weight"], 0.75);
    assert_eq!(j["points"][1]["path"], "density=0.3,lang_eu.weight=0.75/");
    assert!(j["points"][0]["recipe"]
        .as_str()
        .unwrap()
        .contains("merge_method: ties"));
}
