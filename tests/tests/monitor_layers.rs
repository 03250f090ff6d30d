//! The monitor's modules import each other in one direction only (docs/ARCHITECTURE.md,
//! "Layers"): no cycle among them, the arch layer uses nothing of the monitor above it, and the
//! VM glue (`vm.rs`) knows nothing of the scheduler or the control channel. Read from the
//! sources: every `crate::NAME` path names a module (`arch`, `vm`, ...), a macro of one
//! (`println!` is the console's) or an item of the crate root (`main.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../hypervisor/monitor/src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).expect("the monitor's sources") {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to: `arch/gic/mod.rs` is `arch`, `vm.rs` is `vm`,
/// `main.rs` is the crate root.
fn module_of(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Module -> the modules it uses.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&root, f)).collect();
    // Exported macros, by the module that defines them.
    let macro_def = regex::Regex::new(r"macro_rules!\s+([a-z_][a-z0-9_]*)").unwrap();
    let use_path = regex::Regex::new(r"crate::([a-z_][a-z0-9_]*)").unwrap();
    let mut macros = BTreeMap::new();
    let mut texts = Vec::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap();
        let m = module_of(&root, f);
        for c in macro_def.captures_iter(&text) {
            macros.insert(c[1].to_string(), m.clone());
        }
        texts.push((m, text));
    }
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in &texts {
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for c in use_path.captures_iter(code) {
                let name = &c[1];
                let target = if modules.contains(name) {
                    name.to_string()
                } else if let Some(owner) = macros.get(name) {
                    owner.clone()
                } else {
                    "main".to_string()
                };
                if &target != m {
                    g.entry(m.clone()).or_default().insert(target);
                }
            }
        }
        g.entry(m.clone()).or_default();
    }
    g
}

fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn the_monitor_has_no_import_cycle() {
    let g = graph();
    assert!(g.len() > 10, "the sources were read: {g:?}");
    if let Some(c) = find_cycle(&g) {
        panic!(
            "import cycle among the monitor's modules: {}\n{g:#?}",
            c.join(" -> ")
        );
    }
}

#[test]
fn the_arch_layer_and_the_vm_glue_look_only_down() {
    let g = graph();
    let arch = &g["arch"];
    assert!(arch.is_empty(), "arch/ uses modules above it: {arch:?}");
    let vm = &g["vm"];
    for above in ["sched", "control", "bench", "guests", "main"] {
        assert!(!vm.contains(above), "vm.rs uses {above}: {vm:?}");
    }
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default();
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    let c = find_cycle(&g).expect("a cycle");
    assert_eq!(c.first(), c.last());
}
