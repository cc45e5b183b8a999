//! docs/usage.md and `--help` agree: every flag of the daemon and of each subcommand is in
//! both, and nothing documented is missing from the program.

use std::collections::BTreeSet;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-blk");

/// Long flags (`--name`) in a text.
fn flags(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("--") {
        let start = i + at;
        let mut end = start + 2;
        while end < b.len()
            && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'-')
        {
            end += 1;
        }
        let before_ok = start == 0 || !b[start - 1].is_ascii_alphanumeric();
        if end > start + 3 && before_ok {
            out.insert(text[start..end].trim_end_matches('-').to_owned());
        }
        i = end.max(start + 2);
    }
    out
}

fn help(args: &[&str]) -> String {
    let o = Command::new(BIN).args(args).arg("--help").output().unwrap();
    assert!(o.status.success());
    let text = String::from_utf8(o.stdout).unwrap();
    // The flags themselves, not the prose above them.
    let at = text.find("\nOptions:").expect("no Options: in --help");
    text[at..].to_owned()
}

/// The part of usage.md between two headings.
fn section<'a>(doc: &'a str, from: &str, to: &str) -> &'a str {
    let a = doc.find(from).unwrap_or_else(|| panic!("no {from}"));
    let b = doc[a..].find(to).map_or(doc.len(), |b| a + b);
    &doc[a..b]
}

#[test]
fn usage_md_and_help_list_the_same_flags() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/usage.md")).unwrap();
    for heading in [
        "## NAME",
        "## SYNOPSIS",
        "## DESCRIPTION",
        "## OPTIONS",
        "## SUBCOMMANDS",
        "## ENVIRONMENT",
        "## EXIT STATUS",
        "## EXAMPLES",
        "## SEE ALSO",
    ] {
        assert!(
            doc.contains(&format!("\n{heading}\n")),
            "usage.md lacks {heading}"
        );
    }
    let daemon_help = flags(&help(&[]));
    let options = flags(section(&doc, "## OPTIONS", "## SUBCOMMANDS"));
    let synopsis = flags(section(&doc, "## SYNOPSIS", "## DESCRIPTION"));
    assert_eq!(
        daemon_help, options,
        "--help (left) and usage.md OPTIONS (right) differ"
    );
    for f in &daemon_help {
        assert!(
            synopsis.contains(f) || ["--help", "--version"].contains(&f.as_str()),
            "{f} not in the SYNOPSIS"
        );
    }
    let subcommands = section(&doc, "## SUBCOMMANDS", "## IMAGE LOCKING");
    for sub in ["info", "check", "create"] {
        let h = flags(&help(&[sub]));
        let documented = flags(
            section(subcommands, &format!("`{sub} IMAGE"), "\n\n`")
                .split("\n\n")
                .next()
                .unwrap(),
        );
        for f in h.iter().filter(|f| *f != "--help") {
            assert!(
                documented.contains(f),
                "{sub} {f} not in usage.md SUBCOMMANDS"
            );
            assert!(synopsis.contains(f), "{sub} {f} not in the SYNOPSIS");
        }
        for f in &documented {
            assert!(
                h.contains(f),
                "usage.md documents {sub} {f}, --help does not"
            );
        }
    }
}
