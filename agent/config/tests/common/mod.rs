//! Helpers shared by the integration tests: locating `shared/` (the seeds and Istio's CRDs) and
//! extracting the YAML of the seed documents.
#![allow(dead_code)]

use std::path::PathBuf;

pub fn shared_dir(sub: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared")).join(sub);
    if dir.exists() {
        return Some(dir);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "{} is missing; CI must run with shared/ beside the repository",
            dir.display()
        );
    }
    eprintln!(
        "skipping: {} not found (it sits beside the repository in CI)",
        dir.display()
    );
    None
}

pub fn repo_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// A YAML text found in a seed: the file name its heredoc writes (if any) and the text verbatim.
#[derive(Debug)]
pub struct Snippet {
    pub name: Option<String>,
    pub text: String,
}

/// `cat > NAME << 'EOF'` and `cat <<EOF | kubectl apply -f -` heredocs, and ```yaml fences.
pub fn snippets(doc: &str) -> Vec<Snippet> {
    let lines: Vec<&str> = doc.split('\n').collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim_end();
        let (name, end) = if let Some(rest) = line.strip_prefix("cat > ") {
            match rest.strip_suffix(" << 'EOF'") {
                Some(name) => (Some(name.to_string()), "EOF"),
                None => {
                    i += 1;
                    continue;
                }
            }
        } else if line == "cat <<EOF | kubectl apply -f -" {
            (None, "EOF")
        } else if line == "```yaml" {
            (None, "```")
        } else {
            i += 1;
            continue;
        };
        let mut text = String::new();
        i += 1;
        while i < lines.len() && lines[i].trim_end() != end {
            text.push_str(lines[i]);
            text.push('\n');
            i += 1;
        }
        out.push(Snippet { name, text });
        i += 1;
    }
    out
}

pub fn read_seeds() -> Option<(String, String)> {
    let dir = shared_dir("seeds")?;
    let mut tutorial = None;
    let mut blog = None;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        if text.contains("cat > frontend.yaml") {
            tutorial = Some(text);
        } else if text.contains("greeter-service") {
            blog = Some(text);
        }
    }
    Some((tutorial.expect("tutorial seed"), blog.expect("blog seed")))
}

pub const BLOG_NAMES: &[&str] = &[
    "01-subsets-dr.yaml",
    "02-timeout-vs.yaml",
    "03-retries-vs.yaml",
    "04-example-dr.yaml",
    "05-circuit-breaker-dr.yaml",
    "06-vs-no-subsets.yaml",
];
