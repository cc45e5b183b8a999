//! contrib/libvirt: the snippets, wrapped in a minimal domain, validate against the installed
//! libvirt's schema (virt-xml-validate), and agree with the systemd socket unit.

use std::path::Path;
use std::process::Command;

fn contrib(name: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A minimal domain holding the two snippets.
fn domain(memory_backing: &str, disk: &str) -> String {
    format!(
        "<domain type='kvm'>\n<name>vdb-test</name>\n<memory unit='MiB'>1024</memory>\n{memory_backing}\n\
         <os><type arch='x86_64'>hvm</type></os>\n<devices>\n{disk}\n</devices>\n</domain>\n"
    )
}

/// virt-xml-validate's verdict and output, or None if it is not installed.
fn validate(dir: &Path, name: &str, xml: &str) -> Option<(bool, String)> {
    let f = dir.join(name);
    std::fs::write(&f, xml).unwrap();
    let o = match Command::new("virt-xml-validate")
        .arg(&f)
        .arg("domain")
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("virt-xml-validate: {e}"),
    };
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        !text.contains("not found"),
        "virt-xml-validate needs xmllint (libxml2-utils): {text}"
    );
    Some((o.status.success(), text))
}

#[test]
fn snippets_validate_as_a_domain() {
    let disk = contrib("libvirt/disk.xml");
    let mem = contrib("libvirt/memory-backing.xml");
    // The disk connects where the systemd socket unit listens (instance disk0).
    let listen = contrib("systemd/vhost-device-blk@.socket")
        .lines()
        .find_map(|l| l.strip_prefix("ListenStream=").map(str::to_owned))
        .unwrap();
    assert!(
        disk.contains(&format!("path='{}'", listen.replace("%i", "disk0"))),
        "{disk}"
    );
    assert!(disk.contains("<reconnect enabled='yes'"));
    assert!(mem.contains("<source type='memfd'/>") && mem.contains("<access mode='shared'/>"));

    let dir = tempfile::tempdir().unwrap();
    let Some((ok, text)) = validate(dir.path(), "domain.xml", &domain(&mem, &disk)) else {
        eprintln!("SKIPPED: virt-xml-validate not installed (Debian package libvirt-clients)");
        return;
    };
    assert!(ok, "{text}");
    // The validator does look at the disk: an attribute the schema lacks fails it.
    let broken = disk.replace("<source type='unix'", "<source type='unix' bogus='1'");
    let (ok, text) = validate(dir.path(), "broken.xml", &domain(&mem, &broken)).unwrap();
    assert!(!ok, "a broken disk validated: {text}");
}
