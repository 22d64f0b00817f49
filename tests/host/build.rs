//! Binds the host to the very WIT files that ship inside the `spin-sdk` crate the components
//! are built with, so guest and host cannot drift: the version comes from `Cargo.lock`, the
//! files from Cargo's registry sources.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    let lock_path = workspace.join("Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock_path.display());
    println!("cargo:rerun-if-changed=build.rs");

    let lock = fs::read_to_string(&lock_path).expect("Cargo.lock is readable");
    let version = spin_sdk_version(&lock).expect("Cargo.lock names exactly one spin-sdk 5.x");
    let wit = find_sdk_wit(&version).unwrap_or_else(|| {
        panic!("spin-sdk {version} sources not found in Cargo's registry: run `cargo fetch`")
    });
    let cron_wit = workspace.join("components/wit");
    println!("cargo:rerun-if-changed={}", cron_wit.display());

    let bindings = format!(
        r#"wasmtime::component::bindgen!({{
    path: [{sdk:?}, {cron:?}],
    inline: "
        package sparkops:host;
        world platform {{
            import fermyon:spin/variables@2.0.0;
            import fermyon:spin/key-value@2.0.0;
            import fermyon:spin/redis@2.0.0;
            import spin:postgres/postgres@4.0.0;
        }}
        world redis-trigger {{
            include platform;
            export fermyon:spin/inbound-redis;
        }}
        world cron-trigger {{
            include platform;
            use fermyon:spin-cron/cron-types@2.0.0.{{metadata, error}};
            export handle-cron-event: func(metadata: metadata) -> result<_, error>;
        }}
    ",
    world: "platform",
    // Spin 3.6.3 ends the whole invocation when a Redis connection goes to an address
    // `block_networks` blocks (its host code panics); the host traps there too.
    imports: {{
        "fermyon:spin/redis.[static]connection.open": async | trappable,
        default: async,
    }},
    exports: {{ default: async }},
    with: {{
        "fermyon:spin/key-value@2.0.0.store": crate::key_value::Store,
        "fermyon:spin/redis@2.0.0.connection": crate::redis_client::Connection,
        "spin:postgres/postgres@4.0.0.connection": crate::postgres::Connection,
    }},
}});
"#,
        sdk = wit.display().to_string(),
        cron = cron_wit.display().to_string(),
    );
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("spin_bindings.rs");
    fs::write(out, bindings).unwrap();
}

fn spin_sdk_version(lock: &str) -> Option<String> {
    let mut versions = lock
        .split("[[package]]")
        .filter(|pkg| pkg.contains("name = \"spin-sdk\""))
        .filter_map(|pkg| {
            let line = pkg.lines().find(|l| l.starts_with("version = "))?;
            Some(
                line.trim_start_matches("version = ")
                    .trim_matches('"')
                    .to_string(),
            )
        })
        .filter(|v| v.starts_with("5."));
    let first = versions.next()?;
    versions.next().is_none().then_some(first)
}

fn find_sdk_wit(version: &str) -> Option<PathBuf> {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    let src = cargo_home.join("registry/src");
    for index in fs::read_dir(src).ok()?.flatten() {
        let wit = index.path().join(format!("spin-sdk-{version}")).join("wit");
        println!("cargo:rerun-if-changed={}", wit.display());
        if wit.is_dir() {
            return Some(wit);
        }
    }
    None
}
