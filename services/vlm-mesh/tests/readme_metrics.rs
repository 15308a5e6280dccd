//! Every metric the README names is registered by the code and read by some test: a metric a
//! document promises but no test scrapes could vanish or stop moving unnoticed.

use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "target") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Test code: files in a `tests` folder, and `tests.rs` modules.
fn is_test_file(path: &Path) -> bool {
    path.components().any(|c| c.as_os_str() == "tests")
        || path.file_name().is_some_and(|n| n == "tests.rs")
}

#[test]
fn every_metric_the_readme_names_is_registered_and_read_by_a_test() {
    let root = repo();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut files = Vec::new();
    for dir in ["tests", "shared", "services"] {
        rust_files(&root.join(dir), &mut files);
    }
    let this = Path::new(file!()).file_name().unwrap();
    let (mut code, mut tests) = (String::new(), String::new());
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        if f.file_name() == Some(this) {
            continue;
        }
        if is_test_file(f) {
            tests.push_str(&text);
        } else {
            code.push_str(&text);
        }
    }
    // The README's `vlm_…` words that the code registers as a metric name (crate names such as
    // vlm_model are not quoted names in the code).
    let mut names: Vec<&str> = readme
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("vlm_"))
        .filter(|w| {
            // prometheus-client registers a counter without the `_total` it exposes.
            let registered = w.strip_suffix("_total").unwrap_or(w);
            code.contains(&format!("\"{registered}\""))
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(
        names.len() >= 20,
        "only {} metrics found: {names:?}",
        names.len()
    );
    let unread: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !tests.contains(n))
        .collect();
    assert!(
        unread.is_empty(),
        "metrics the README names that no test reads: {unread:?}"
    );
}
