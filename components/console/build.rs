//! Builds the console's browser code (`web/`) at build time: `npm ci` from the pinned lock
//! file (packages checked by npm against the registry's integrity hashes), a type check
//! (`tsc`), one minified bundle by esbuild with content-hashed names, and a gzip copy of
//! each asset. The component embeds the result (`$OUT_DIR/assets.rs`), so the page never
//! loads code from anywhere but the app.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot start {:?}: {e} (is npm installed?)",
            cmd.get_program()
        )
    });
    if !out.status.success() {
        panic!(
            "{what} failed with {}:\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("creating a source folder");
    for entry in std::fs::read_dir(from).expect("reading web/src") {
        let entry = entry.expect("a folder entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copying a source file");
        }
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next() {
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        other => panic!("no content type for .{other:?}"),
    }
}

fn main() {
    let web =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it")).join("web");
    for f in [
        "package.json",
        "package-lock.json",
        "tsconfig.json",
        "src",
        "public",
    ] {
        println!("cargo:rerun-if-changed=web/{f}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let npm = out.join("npm");
    std::fs::create_dir_all(&npm).expect("creating the npm folder");

    // Packages: reinstalled only when the lock file changes.
    let lock = std::fs::read(web.join("package-lock.json")).expect("web/package-lock.json");
    let installed = npm.join("installed.lock");
    if std::fs::read(&installed).ok().as_deref() != Some(&lock[..]) {
        for f in ["package.json", "package-lock.json"] {
            std::fs::copy(web.join(f), npm.join(f)).expect("copying the package files");
        }
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&npm),
            "npm ci (components/console/web)",
        );
        std::fs::write(&installed, &lock).expect("noting the installed lock");
    }

    // The sources beside their packages, so tsc and esbuild resolve imports the usual way.
    let _ = std::fs::remove_dir_all(npm.join("src"));
    copy_dir(&web.join("src"), &npm.join("src"));
    std::fs::copy(web.join("tsconfig.json"), npm.join("tsconfig.json")).expect("tsconfig");
    run(
        Command::new(npm.join("node_modules/.bin/tsc"))
            .args(["-p", "."])
            .current_dir(&npm),
        "type check (tsc) of components/console/web/src",
    );
    let dist = npm.join("dist");
    let _ = std::fs::remove_dir_all(&dist);
    run(
        Command::new(npm.join("node_modules/.bin/esbuild"))
            .args([
                "src/main.tsx",
                "--bundle",
                "--minify",
                "--format=esm",
                "--target=es2022",
                "--jsx=automatic",
                "--jsx-import-source=preact",
                "--legal-comments=none",
                "--entry-names=[name]-[hash]",
                "--outdir=dist",
            ])
            .current_dir(&npm),
        "esbuild (components/console/web)",
    );
    copy_dir(&web.join("public"), &dist);

    let mut assets = String::from("&[\n");
    let (mut script, mut style) = (None, None);
    let mut names: Vec<_> = std::fs::read_dir(&dist)
        .expect("reading the bundle")
        .map(|e| {
            e.expect("a bundle entry")
                .file_name()
                .into_string()
                .expect("a UTF-8 name")
        })
        .filter(|n| !n.ends_with(".gz"))
        .collect();
    names.sort();
    for name in &names {
        let path = dist.join(name);
        let gz = dist.join(format!("{name}.gz"));
        let packed = Command::new("gzip")
            .args(["-9", "-n", "-c"])
            .arg(&path)
            .output()
            .expect("gzip runs");
        assert!(packed.status.success(), "gzip {name}");
        std::fs::write(&gz, packed.stdout).expect("writing the gzip copy");
        if name.starts_with("main-") && name.ends_with(".js") {
            script = Some(name.clone());
        } else if name.starts_with("main-") && name.ends_with(".css") {
            style = Some(name.clone());
        }
        // Paths relative to OUT_DIR as the compiler sees it: the target directory may be
        // shared by clones at other paths (infra/dev links a machine-wide one).
        let under_out = |p: &Path| {
            p.strip_prefix(&out)
                .expect("assets are under OUT_DIR")
                .display()
                .to_string()
        };
        writeln!(
            assets,
            "    Asset {{ name: {name:?}, content_type: {:?}, body: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{}\")), gzip: include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{}\")) }},",
            content_type(name),
            under_out(&path),
            under_out(&gz),
        )
        .expect("writing to a string");
    }
    assets += "]";
    let script = script.expect("esbuild wrote main-*.js");
    let style = style.expect("esbuild wrote main-*.css");
    let shell = std::fs::read_to_string(web.join("index.html"))
        .expect("web/index.html")
        .replace("{{script}}", &format!("/console/assets/{script}"))
        .replace("{{style}}", &format!("/console/assets/{style}"));
    println!("cargo:rerun-if-changed=web/index.html");
    std::fs::write(out.join("assets.rs"), assets).expect("writing assets.rs");
    std::fs::write(out.join("index.html"), shell).expect("writing index.html");
}
