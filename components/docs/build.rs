//! Takes the Swagger UI and ReDoc bundles from the npm registry at build time (pinned
//! versions, checked by npm against the registry's integrity hashes), so the pages never
//! load code from a CDN when they are opened.

use std::path::Path;
use std::process::Command;

/// (package@version, files to keep from its `package/` folder).
const PACKAGES: [(&str, &[&str]); 2] = [
    (
        "swagger-ui-dist@5.35.0",
        &[
            "swagger-ui.css",
            "swagger-ui-bundle.js",
            "swagger-ui-standalone-preset.js",
        ],
    ),
    ("redoc@2.5.4", &["bundles/redoc.standalone.js"]),
];

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot start {:?}: {e} (is npm installed?)",
            cmd.get_program()
        )
    });
    assert!(status.success(), "{what} failed with {status}");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let out = Path::new(&out);
    for (package, files) in PACKAGES {
        let name = package.split('@').next().unwrap_or(package);
        if files.iter().all(|f| out.join(name).join(f).exists()) {
            continue;
        }
        let dir = out.join(name);
        std::fs::create_dir_all(&dir).expect("creating the asset folder");
        run(
            Command::new("npm")
                .args(["pack", package, "--silent", "--pack-destination"])
                .arg(&dir),
            &format!("npm pack {package}"),
        );
        let tarball = std::fs::read_dir(&dir)
            .expect("reading the asset folder")
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "tgz"))
            .expect("npm pack wrote a tarball");
        run(
            Command::new("tar")
                .args(["xzf"])
                .arg(&tarball)
                .args(["-C"])
                .arg(&dir)
                .args(["--strip-components=1"]),
            &format!("unpacking {package}"),
        );
        for f in files {
            assert!(dir.join(f).exists(), "{package} has no {f}");
        }
    }
}
