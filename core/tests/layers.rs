//! The layers, checked (docs/DESIGN.md, "Layers").
//!
//! - Crates: `rio-sys` < `rio-spdk-sys` < `rio` < `rio-otel` < `rio-cli`; a crate's `[dependencies]` name only
//!   crates below it.
//! - The embeddable crate's normal dependency tree (`cargo tree -p rio -e normal`) holds no
//!   command-line, terminal, HTTP, RPC, OpenTelemetry, async-runtime or plotting crate.
//! - Modules of `rio`: each belongs to a layer ([`RIO_LAYERS`]) and imports only from layers
//!   below its own. Test code (`#[cfg(test)]` items and test-only files) may import anything.
//! - Modules of the other crates: no import cycle.
//!
//! The checker reads the sources as text: paths through `crate::`, `super::`, `self::` and child
//! modules, `use` trees with groups included; comments and string literals are ignored. Its own
//! tests at the bottom feed it a tree with a violation and a cycle, so it can fail.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Units of the `rio` crate, lowest layer first. A unit is a module path; a module belongs to
/// the longest unit that prefixes its path. The crate root (`lib.rs`) only re-exports.
const RIO_LAYERS: &[&[&str]] = &[
    // Leaves: plain data and algorithms that import nothing else of the crate.
    &["op", "nvme::spec", "pool", "tune", "rng", "units"],
    &["error"],
    // Memory, targets, settings (plain data), measurement windows, the device model.
    &["buf", "target", "config", "window", "nvme::sim"],
    // The userspace NVMe driver: controller bring-up, admin queue, rings, DMA.
    &["nvme"],
    // The backends: io_uring, psync, the driver's I/O path.
    &["backend"],
    &["queue"],
    &["engine"],
    &["runtime", "info"],
];

/// Crates of the workspace, lowest first, with their directories.
const CRATES: &[(&str, &str)] = &[
    ("rio-sys", "sys"),
    ("rio-spdk-sys", "sys/spdk"),
    ("rio", "core"),
    ("rio-otel", "otel"),
    ("rio-cli", "cli"),
];

/// What an embedder must not get with `rio`: CLI, terminal, HTTP/RPC, telemetry export, async
/// runtimes, plotting and JSON.
const NOT_IN_RIO: &[&str] = &[
    "clap",
    "indicatif",
    "signal-hook",
    "tracing-subscriber",
    "plotters",
    "reqwest",
    "hyper",
    "h2",
    "http",
    "tonic",
    "tower",
    "prost",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry-otlp",
    "opentelemetry-proto",
    "tracing-opentelemetry",
    "tokio",
    "serde_json",
    "criterion",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("core/ has a parent")
        .to_path_buf()
}

// ------------------------------------------------------------------------------------------
// Source scanning

/// `src` with comments, string and character literals blanked (newlines kept).
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == b'\n' {
                        out.push(b'\n');
                    }
                    i += 1;
                }
            }
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // Raw string r"..." or r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= b.len() {
                    break;
                }
                if b[j] == b'"' && (0..hashes).all(|k| b.get(j + 1 + k) == Some(&b'#')) {
                    j += 1 + hashes;
                    break;
                }
                if b[j] == b'\n' {
                    out.push(b'\n');
                }
                j += 1;
            }
            out.extend_from_slice(b"\"\"");
            i = j;
        } else if c == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                if i < b.len() && b[i] == b'\n' {
                    out.push(b'\n');
                }
                i += 1;
            }
            out.extend_from_slice(b"\"\"");
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let end = if b.get(i + 1) == Some(&b'\\') {
                (i + 3..b.len().min(i + 12)).find(|&j| b[j] == b'\'')
            } else if b.get(i + 2) == Some(&b'\'') {
                Some(i + 2)
            } else {
                None
            };
            match end {
                Some(e) => {
                    out.extend_from_slice(b"' '");
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).expect("stripping keeps UTF-8 boundaries")
}

/// Index just past the `}` that closes the `{` at `open`.
fn close_brace(s: &[u8], open: usize) -> usize {
    let mut depth = 0;
    for (k, &c) in s.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return k + 1;
                }
            }
            _ => {}
        }
    }
    s.len()
}

/// Removes `#[cfg(test)]` items from stripped source; returns the rest and the names of
/// test-only child modules declared as files (`#[cfg(test)] mod tests;`).
fn drop_test_items(s: &str) -> (String, Vec<String>) {
    let mut out = String::new();
    let mut test_mods = Vec::new();
    let mut rest = s;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let b = item.as_bytes();
        let semi = item.find(';').unwrap_or(item.len());
        let brace = item.find('{').unwrap_or(item.len());
        let end = if semi < brace {
            let decl = item[..semi].trim_end();
            if let Some(m) = decl.rsplit_once("mod ") {
                test_mods.push(m.1.trim().to_string());
            }
            semi + 1
        } else {
            close_brace(b, brace)
        };
        out.extend(item[..end].chars().filter(|&c| c == '\n'));
        rest = &item[end..];
    }
    out.push_str(rest);
    (out, test_mods)
}

fn ident_at(s: &[u8], mut i: usize) -> (String, usize) {
    let start = i;
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
        i += 1;
    }
    (String::from_utf8_lossy(&s[start..i]).into_owned(), i)
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && s[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Parses a path or a `use` tree at `i` (after a `::`), appending every full path under
/// `prefix` to `out`. Returns where it stopped.
fn tree(s: &[u8], i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let i = skip_ws(s, i);
    if s.get(i) == Some(&b'{') {
        let mut j = i + 1;
        loop {
            j = skip_ws(s, j);
            match s.get(j) {
                None => return j,
                Some(b'}') => return j + 1,
                Some(b',') => j += 1,
                _ => {
                    let k = tree(s, j, prefix, out);
                    j = if k == j { j + 1 } else { k };
                }
            }
        }
    }
    let (id, mut j) = ident_at(s, i);
    if id.is_empty() {
        if s.get(i) == Some(&b'*') {
            out.push(prefix.to_vec());
            return i + 1;
        }
        return i;
    }
    let mut p = prefix.to_vec();
    if id != "self" {
        p.push(id);
    }
    let k = skip_ws(s, j);
    if s.get(k) == Some(&b':') && s.get(k + 1) == Some(&b':') {
        j = tree(s, k + 2, &p, out);
    } else {
        out.push(p);
    }
    j
}

/// Module path of a source file under `src/`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("file under src/");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

/// Every crate-internal path one (stripped, test-free) source file names, made absolute.
fn paths_named(module: &[String], code: &str) -> Vec<Vec<String>> {
    let s = code.as_bytes();
    // Child modules declared here: `use child::x` and `child::x` resolve under this module.
    let children: BTreeSet<String> = code
        .split([';', '{'])
        .filter_map(|d| {
            let d = d.trim();
            let d = d.strip_prefix("pub(crate) ").unwrap_or(d);
            let d = d.strip_prefix("pub ").unwrap_or(d);
            d.strip_prefix("mod ").map(|m| m.trim().to_string())
        })
        .filter(|m| !m.is_empty() && m.chars().all(|c| c.is_alphanumeric() || c == '_'))
        .collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let boundary = i == 0 || !(s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_');
        if !boundary || !(s[i].is_ascii_alphabetic() || s[i] == b'_') {
            i += 1;
            continue;
        }
        // A path preceded by `::` is the tail of another path, not a root of its own.
        if i >= 2 && &s[i - 2..i] == b"::" {
            let (_, j) = ident_at(s, i);
            i = j;
            continue;
        }
        let (id, j) = ident_at(s, i);
        let k = skip_ws(s, j);
        let is_path = s.get(k) == Some(&b':') && s.get(k + 1) == Some(&b':');
        if !is_path {
            i = j;
            continue;
        }
        let base: Option<Vec<String>> = match id.as_str() {
            "crate" => Some(Vec::new()),
            "self" => Some(module.to_vec()),
            "super" => {
                let mut m = module.to_vec();
                m.pop();
                let mut at = k + 2;
                loop {
                    let (next, e) = ident_at(s, skip_ws(s, at));
                    let after = skip_ws(s, e);
                    if next == "super"
                        && s.get(after) == Some(&b':')
                        && s.get(after + 1) == Some(&b':')
                    {
                        m.pop();
                        at = after + 2;
                    } else {
                        break;
                    }
                }
                let mut p = Vec::new();
                let e = tree(s, at, &m, &mut p);
                out.extend(p);
                i = e.max(j);
                continue;
            }
            c if children.contains(c) => {
                let mut m = module.to_vec();
                m.push(c.to_string());
                Some(m)
            }
            _ => None,
        };
        match base {
            Some(b) => {
                let e = tree(s, k + 2, &b, &mut out);
                i = e.max(j);
            }
            None => i = j,
        }
    }
    out
}

/// One unit's reference to another: (from unit, to unit, file, path).
type Edge = (String, String, PathBuf, String);

/// Every edge between units in the crate at `src/`; `unit_of` maps a module path to its unit.
fn edges(src: &Path, unit_of: &dyn Fn(&[String]) -> Option<String>) -> Vec<Edge> {
    let mut files = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display())) {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    files.sort();
    // Test-only files: declared `#[cfg(test)] mod x;` by their parent.
    let mut test_only: BTreeSet<Vec<String>> = BTreeSet::new();
    let mut parsed = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("source is UTF-8");
        let (code, test_mods) = drop_test_items(&strip(&text));
        let m = module_of(src, f);
        for t in test_mods {
            let mut tm = m.clone();
            tm.push(t);
            test_only.insert(tm);
        }
        parsed.push((f.clone(), m, code));
    }
    let mut out = Vec::new();
    for (f, m, code) in parsed {
        if test_only.iter().any(|t| m.starts_with(t)) {
            continue;
        }
        let Some(from) = unit_of(&m) else { continue };
        for p in paths_named(&m, &code) {
            if let Some(to) = unit_of(&p)
                && to != from
            {
                out.push((from.clone(), to, f.clone(), p.join("::")));
            }
        }
    }
    out
}

/// The unit of `path` among `units`: the longest unit that prefixes it.
fn longest_unit(units: &[&str], path: &[String]) -> Option<String> {
    units
        .iter()
        .filter(|u| {
            let segs: Vec<&str> = u.split("::").collect();
            segs.len() <= path.len() && segs.iter().zip(path).all(|(a, b)| *a == b)
        })
        .max_by_key(|u| u.split("::").count())
        .map(|u| u.to_string())
}

/// Edges from a layer to the same or a higher layer, as messages.
fn layer_violations(layers: &[&[&str]], edges: &[Edge]) -> Vec<String> {
    let level: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .flat_map(|(l, us)| us.iter().map(move |u| (*u, l)))
        .collect();
    let mut out: Vec<String> = edges
        .iter()
        .filter(|(a, b, _, _)| level[a.as_str()] <= level[b.as_str()])
        .map(|(a, b, f, p)| {
            format!(
                "{} (layer {}) imports {} (layer {}): {p} in {}",
                a,
                level[a.as_str()] + 1,
                b,
                level[b.as_str()] + 1,
                f.display()
            )
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// One import cycle among top-level modules, if any, as "a -> b -> a".
fn find_cycle(edges: &[Edge]) -> Option<String> {
    let mut g: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (a, b, _, _) in edges {
        g.entry(a).or_default().insert(b);
    }
    fn visit<'a>(
        n: &'a str,
        g: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<String> {
        state.insert(n, 1);
        path.push(n);
        for &m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = path.iter().position(|&x| x == m).expect("on the path");
                    let mut c: Vec<&str> = path[at..].to_vec();
                    c.push(m);
                    return Some(c.join(" -> "));
                }
                0 => {
                    if let Some(c) = visit(m, g, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n, 2);
        None
    }
    let mut state = BTreeMap::new();
    let nodes: Vec<&str> = g.keys().copied().collect();
    for n in nodes {
        if state.get(n).copied().unwrap_or(0) == 0 {
            let mut path = Vec::new();
            if let Some(c) = visit(n, &g, &mut state, &mut path) {
                return Some(c);
            }
        }
    }
    None
}

fn top_module(path: &[String]) -> Option<String> {
    path.first().cloned()
}

// ------------------------------------------------------------------------------------------
// The checks

#[test]
fn every_module_of_rio_has_a_layer() {
    let src = workspace().join("core/src");
    let units: Vec<&str> = RIO_LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
    let mut missing = Vec::new();
    for e in std::fs::read_dir(&src).expect("core/src") {
        let p = e.expect("entry").path();
        let name = p
            .file_stem()
            .expect("a name")
            .to_string_lossy()
            .into_owned();
        if name == "lib" {
            continue;
        }
        if longest_unit(&units, std::slice::from_ref(&name)).is_none() {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "modules with no layer in RIO_LAYERS (core/tests/layers.rs; also docs/DESIGN.md): {missing:?}"
    );
}

#[test]
fn rio_modules_import_only_lower_layers() {
    let units: Vec<&str> = RIO_LAYERS.iter().flat_map(|l| l.iter().copied()).collect();
    let unit_of = |p: &[String]| longest_unit(&units, p);
    let e = edges(&workspace().join("core/src"), &unit_of);
    assert!(
        e.len() > 30,
        "the checker found only {} cross-layer imports: it is not reading the sources",
        e.len()
    );
    let v = layer_violations(RIO_LAYERS, &e);
    assert!(
        v.is_empty(),
        "a lower layer imports a higher one (move the shared type down, or the code up):\n{}",
        v.join("\n")
    );
}

#[test]
fn the_other_crates_have_no_module_cycle() {
    for dir in ["sys", "sys/spdk", "otel", "cli"] {
        let e = edges(&workspace().join(dir).join("src"), &top_module);
        if let Some(c) = find_cycle(&e) {
            panic!("import cycle between modules of {dir}/: {c}");
        }
    }
}

#[test]
fn crates_depend_only_on_lower_crates() {
    let names: Vec<&str> = CRATES.iter().map(|c| c.0).collect();
    for (level, (name, dir)) in CRATES.iter().enumerate() {
        let manifest = workspace().join(dir).join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).expect("a manifest");
        let t: toml::Table = text.parse().expect("the manifest parses");
        assert_eq!(
            t["package"]["name"].as_str(),
            Some(*name),
            "{} names another package",
            manifest.display()
        );
        for section in ["dependencies", "build-dependencies"] {
            let Some(deps) = t.get(section).and_then(|d| d.as_table()) else {
                continue;
            };
            for dep in deps.keys() {
                if let Some(l) = names.iter().position(|n| n == dep) {
                    assert!(
                        l < level,
                        "{name} ({section}) depends on {dep}, which is not below it"
                    );
                }
            }
        }
    }
}

#[test]
fn the_embeddable_crate_pulls_no_cli_http_or_plotting_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace())
        .args([
            "tree",
            "-p",
            "rio",
            "--edges",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "--offline",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let crates: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        crates.contains("rio") && crates.contains("io-uring") && crates.contains("rio-sys"),
        "unexpected cargo tree output:\n{text}"
    );
    let bad: Vec<&&str> = NOT_IN_RIO.iter().filter(|c| crates.contains(**c)).collect();
    assert!(
        bad.is_empty(),
        "`cargo tree -p rio -e normal` lists {bad:?}: the embeddable crate must not pull them"
    );
}

// ------------------------------------------------------------------------------------------
// The checker's own tests: it must see what it is there to catch.

fn scratch_tree(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("a temp dir");
    for (name, text) in files {
        let p = d.path().join(name);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }
    d
}

#[test]
fn checker_catches_an_upward_import_in_every_path_form() {
    let layers: &[&[&str]] = &[&["a::leaf"], &["low"], &["a"], &["high"]];
    let units: Vec<&str> = layers.iter().flat_map(|l| l.iter().copied()).collect();
    let unit_of = |p: &[String]| longest_unit(&units, p);
    for (what, low_src) in [
        ("use crate::x", "use crate::high::Thing;\n"),
        (
            "grouped use",
            "use crate::{a::leaf::X, high::{Thing, Other}};\n",
        ),
        ("inline path", "fn f() { let _ = crate::high::make(); }\n"),
    ] {
        let d = scratch_tree(&[
            ("lib.rs", "mod low; mod a; mod high;"),
            ("low.rs", low_src),
            ("a/mod.rs", "pub mod leaf;\nuse crate::low::X;\n"),
            ("a/leaf.rs", "pub struct X;\n"),
            ("high.rs", "use crate::a::Y;\n"),
        ]);
        let e = edges(d.path(), &unit_of);
        let v = layer_violations(layers, &e);
        assert!(!v.is_empty(), "{what}: not caught");
        assert!(
            v.iter()
                .all(|m| m.starts_with("low (layer 2) imports high (layer 4): high::")),
            "{what}: {v:?}"
        );
    }
    // `super::` from a leaf submodule into its parent's unit is upward too.
    let d = scratch_tree(&[
        ("lib.rs", "mod low; mod a; mod high;"),
        ("low.rs", ""),
        ("a/mod.rs", "pub mod leaf;\npub struct Y;\n"),
        ("a/leaf.rs", "use super::Y;\n"),
        ("high.rs", ""),
    ]);
    let v = layer_violations(layers, &edges(d.path(), &unit_of));
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(
        v[0].starts_with("a::leaf (layer 1) imports a (layer 3)"),
        "{v:?}"
    );
}

#[test]
fn checker_ignores_comments_strings_and_test_code() {
    let layers: &[&[&str]] = &[&["low"], &["high"]];
    let units: Vec<&str> = layers.iter().flat_map(|l| l.iter().copied()).collect();
    let unit_of = |p: &[String]| longest_unit(&units, p);
    let d = scratch_tree(&[
        ("lib.rs", "mod low; mod high;"),
        (
            "low.rs",
            "//! See [`crate::high::Thing`].\n\
             /* crate::high::X */\n\
             const S: &str = \"crate::high::Y\";\n\
             const C: char = '{';\n\
             fn f() -> u8 { 1 }\n\
             #[cfg(test)]\nmod tests {\n    use crate::high::Thing;\n    fn g() { if true { } }\n}\n\
             #[cfg(test)]\nmod more;\n",
        ),
        ("low/more.rs", "use crate::high::Thing;\n"),
        ("high.rs", "use crate::low::f;\n"),
    ]);
    let e = edges(d.path(), &unit_of);
    assert_eq!(layer_violations(layers, &e), Vec::<String>::new());
    assert_eq!(e.len(), 1, "{e:?}");
}

#[test]
fn checker_finds_a_cycle() {
    let d = scratch_tree(&[
        ("lib.rs", "mod pci; mod vfio;"),
        ("pci.rs", "pub use crate::vfio::Region;\n"),
        ("vfio.rs", "fn f() { crate::pci::members(); }\n"),
    ]);
    let e = edges(d.path(), &top_module);
    let c = find_cycle(&e).expect("a cycle");
    assert!(
        c == "pci -> vfio -> pci" || c == "vfio -> pci -> vfio",
        "{c}"
    );
}
