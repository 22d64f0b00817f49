//! `infra/kubernetes` checked against `spin.toml`: the deployment an operator applies runs
//! every component exactly once, on an executor that accepts its trigger, with every
//! setting it needs fed, pinned images, and runtime configs that parse and block what they
//! must. [`parts`] reads the SpinApps as deployed, for the suites that run them
//! (`deployment`, and `spin_smoke` under the real Spin CLI).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;
use sparkops_host::manifest::{Manifest, RouteSpec};
use sparkops_host::outbound::BlockedNetworks;
use sparkops_host::runtime_config::RuntimeConfig;

use crate::common::workspace;

/// SpinKube's runtime for SpinApps: the containerd shim.
const SHIM: &str = "containerd-shim-spin";

fn dir() -> PathBuf {
    workspace().join("infra/kubernetes")
}

/// One SpinApp as deployed: its executor, its effective image (after kustomize's `images`),
/// its component set, the Spin variables it feeds and its runtime config.
#[derive(Debug, Clone)]
pub struct Part {
    pub name: String,
    pub executor: String,
    pub image: String,
    pub components: Vec<String>,
    pub variables: BTreeSet<String>,
    /// The variables given as plain values (`value:`), not from a Secret.
    pub values: BTreeMap<String, String>,
    pub pod_labels: BTreeMap<String, String>,
    /// The runtime config's file, from the secret `runtimeConfig.loadFromSecret` names.
    pub runtime_config: PathBuf,
}

impl Part {
    /// Whether SpinKube's shim runs this part (the other executor is the Spin CLI).
    pub fn on_shim(&self) -> bool {
        self.executor == SHIM
    }

    /// Its runtime config with the key-value store on `redis_url`, for a local run.
    pub fn runtime_config_for(&self, redis_url: &str) -> String {
        let mut config: toml::Table =
            toml::from_str(&std::fs::read_to_string(&self.runtime_config).unwrap()).unwrap();
        if let Some(store) = config
            .get_mut("key_value_store")
            .and_then(|s| s.get_mut("default"))
            .and_then(|s| s.as_table_mut())
        {
            store.insert("url".into(), redis_url.into());
        }
        toml::to_string(&config).unwrap()
    }
}

/// Everything `kubectl apply -k infra/kubernetes` creates, as parsed documents.
struct Deployment {
    kustomization: Value,
    documents: Vec<Value>,
}

fn yaml_documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    yaml_serde::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|doc| !doc.is_null())
        .collect()
}

impl Deployment {
    fn load() -> Self {
        let kustomization = yaml_documents(&dir().join("kustomization.yaml")).remove(0);
        let documents = strings(&kustomization["resources"])
            .iter()
            .flat_map(|file| yaml_documents(&dir().join(file)))
            .collect();
        Self {
            kustomization,
            documents,
        }
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.documents.iter().filter(move |d| d["kind"] == kind)
    }

    /// `image` as kustomize's `images` list rewrites it (`newName`, `newTag`, `digest`).
    fn effective_image(&self, image: &str) -> String {
        let (name, _) = split_image(image);
        let Some(rule) = self.kustomization["images"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == name)
        else {
            return image.to_string();
        };
        let name = rule["newName"].as_str().unwrap_or(name);
        match (rule["digest"].as_str(), rule["newTag"].as_str()) {
            (Some(digest), _) => format!("{name}@{digest}"),
            (None, Some(tag)) => format!("{name}:{tag}"),
            (None, None) => format!("{name}{}", &image[split_image(image).0.len()..]),
        }
    }

    /// The files a `secretGenerator` entry builds its secret from, by key.
    fn generated_secret(&self, name: &str) -> BTreeMap<String, PathBuf> {
        let generator = self.kustomization["secretGenerator"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|g| g["name"] == name)
            .unwrap_or_else(|| panic!("no secretGenerator makes the secret `{name}`"));
        let mut keys = BTreeMap::new();
        for file in strings(&generator["files"]) {
            let (key, path) = file
                .split_once('=')
                .unwrap_or((file.as_str(), file.as_str()));
            keys.insert(key.to_string(), dir().join(path));
        }
        for env_file in strings(&generator["envs"]) {
            // The operator writes the env file; the repository carries its example.
            let example = dir().join(format!("{env_file}.example"));
            for key in env_keys(&example) {
                keys.insert(key, example.clone());
            }
        }
        keys
    }

    fn parts(&self) -> Vec<Part> {
        self.of_kind("SpinApp")
            .map(|app| {
                let spec = &app["spec"];
                let name = app["metadata"]["name"].as_str().unwrap().to_string();
                let secret = spec["runtimeConfig"]["loadFromSecret"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: no runtimeConfig.loadFromSecret"));
                let runtime_config = self
                    .generated_secret(secret)
                    .remove("runtime-config.toml")
                    .unwrap_or_else(|| panic!("{secret} has no key runtime-config.toml"));
                let variables = spec["variables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| {
                        let var = v["name"].as_str().unwrap().to_string();
                        let key = &v["valueFrom"]["secretKeyRef"];
                        if !key.is_null() {
                            let fed = self.generated_secret(key["name"].as_str().unwrap());
                            let k = key["key"].as_str().unwrap();
                            assert!(fed.contains_key(k), "{name}: {var} names missing key {k}");
                        }
                        var
                    })
                    .collect();
                let values = spec["variables"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| Some((v["name"].as_str()?.into(), v["value"].as_str()?.into())))
                    .collect();
                let pod_labels = spec["podLabels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                    .collect();
                Part {
                    pod_labels,
                    executor: spec["executor"].as_str().unwrap_or_default().to_string(),
                    image: self.effective_image(spec["image"].as_str().unwrap()),
                    components: strings(&spec["components"]),
                    variables,
                    values,
                    runtime_config,
                    name,
                }
            })
            .collect()
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// `repository` and the rest (`:tag`, `@digest` or nothing) of an image reference.
fn split_image(image: &str) -> (&str, &str) {
    if let Some(at) = image.find('@') {
        return image.split_at(at);
    }
    match image.rfind(':') {
        Some(colon) if !image[colon..].contains('/') => image.split_at(colon),
        _ => (image, ""),
    }
}

/// Pinned: a digest, or a tag other than `latest`.
fn pinned(image: &str) -> bool {
    let (_, rest) = split_image(image);
    rest.starts_with("@sha256:") || (rest.starts_with(':') && rest != ":latest")
}

fn env_keys(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_once('=').expect("KEY=value").0.to_string())
        .collect()
}

/// The app's variables a template names: `{{ name }}`.
fn template_names(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        let Some(end) = rest[start..].find("}}") else {
            break;
        };
        names.push(rest[start + 2..start + end].trim().to_string());
        rest = &rest[start + end + 2..];
    }
    names
}

/// The app variables a set of components reads: through their variables and allowed hosts,
/// and, with a Redis-triggered component, the app's Redis address and channels.
fn variables_used(manifest: &Manifest, components: &[String]) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for id in components {
        let c = &manifest.component[id];
        for text in c.variables.values().chain(&c.allowed_outbound_hosts) {
            used.extend(template_names(text));
        }
    }
    let redis: Vec<_> = manifest
        .trigger
        .redis
        .iter()
        .filter(|t| components.contains(&t.component))
        .collect();
    if !redis.is_empty() {
        if let Some(r) = &manifest.application.trigger.redis {
            used.extend(template_names(&r.address));
        }
        for t in redis {
            used.extend(template_names(&t.channel));
        }
    }
    used
}

/// The SpinApps of `infra/kubernetes`, as deployed.
pub fn parts() -> Vec<Part> {
    Deployment::load().parts()
}

/// The deployed part that runs `component`.
pub fn part_running(component: &str) -> Part {
    parts()
        .into_iter()
        .find(|p| p.components.iter().any(|c| c == component))
        .unwrap_or_else(|| panic!("no part runs {component}"))
}

fn app_manifest() -> Manifest {
    Manifest::load(&workspace().join("spin.toml")).unwrap().0
}

#[test]
fn every_component_is_deployed_exactly_once() {
    let manifest = app_manifest();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for part in parts() {
        for c in &part.components {
            seen.entry(c.clone()).or_default().push(part.name.clone());
        }
    }
    let all: Vec<_> = manifest.component.keys().cloned().collect();
    let deployed: Vec<_> = seen.keys().cloned().collect();
    assert_eq!(deployed, all, "deployed components against spin.toml's");
    for (c, parts) in seen {
        assert_eq!(parts.len(), 1, "{c} is deployed by {parts:?}");
    }
}

#[test]
fn each_part_starts_on_its_executor() {
    let deployment = Deployment::load();
    let executors: BTreeMap<String, &Value> = deployment
        .of_kind("SpinAppExecutor")
        .map(|e| (e["metadata"]["name"].as_str().unwrap().to_string(), e))
        .collect();
    for part in deployment.parts() {
        let mut manifest = app_manifest();
        manifest
            .retain_components(&part.components)
            .unwrap_or_else(|e| panic!("{}: {e}", part.name));
        if part.on_shim() {
            // What the shim would say on start-up.
            manifest
                .refuse_what_spinkube_refuses()
                .unwrap_or_else(|e| panic!("{} on the shim: {e}", part.name));
        } else {
            let executor = executors
                .get(&part.executor)
                .unwrap_or_else(|| panic!("{}: no SpinAppExecutor {}", part.name, part.executor));
            let image = executor["spec"]["deploymentConfig"]["spinImage"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: executor without spinImage", part.executor));
            assert!(pinned(image), "{} runs the unpinned {image}", part.executor);
            // The Spin CLI gets `--listen` from spin-operator, which Spin refuses without an
            // HTTP trigger: the image's entry point drops it (spin_smoke runs it), so a
            // part there must have none.
            assert!(
                manifest.trigger.http.is_empty(),
                "{} serves HTTP on the Spin CLI executor",
                part.name
            );
        }
    }
}

#[test]
fn every_setting_a_part_needs_is_fed() {
    let manifest = app_manifest();
    for part in parts() {
        for var in &part.variables {
            assert!(
                manifest.variables.contains_key(var),
                "{} feeds `{var}`, which spin.toml does not declare",
                part.name
            );
        }
        for var in variables_used(&manifest, &part.components) {
            let decl = &manifest.variables[&var];
            // Required ones, and those whose default only works on a developer's machine.
            let local_default = decl
                .default
                .as_deref()
                .is_some_and(|d| d.contains("127.0.0.1") || d.contains("localhost"));
            if decl.required || local_default {
                assert!(
                    part.variables.contains(&var),
                    "{} does not feed `{var}`, which its components read",
                    part.name
                );
            }
        }
    }
}

#[test]
fn steps_are_handed_to_the_part_that_runs_the_executor() {
    let executor_part = part_running("executor");
    assert!(executor_part.on_shim());
    let deployment = Deployment::load();
    let namespace = deployment.kustomization["namespace"].as_str().unwrap();
    let fed = deployment.generated_secret("sparkops-variables");
    let example = std::fs::read_to_string(&fed["dispatch_url"]).unwrap();
    let dispatch_url = example
        .lines()
        .find_map(|l| l.strip_prefix("dispatch_url="))
        .unwrap();
    // spin-operator names the Service after the SpinApp.
    assert_eq!(
        dispatch_url,
        format!(
            "http://{}.{namespace}.svc.cluster.local",
            executor_part.name
        )
    );
}

#[test]
fn every_image_is_pinned_and_the_parts_run_one_app() {
    let deployment = Deployment::load();
    let parts = deployment.parts();
    let app_images: BTreeSet<_> = parts.iter().map(|p| p.image.clone()).collect();
    assert_eq!(
        app_images.len(),
        1,
        "the parts run different apps: {app_images:?}"
    );
    let mut images: Vec<String> = app_images.into_iter().collect();
    for doc in &deployment.documents {
        let pod = match doc["kind"].as_str() {
            Some("Job") | Some("Deployment") => &doc["spec"]["template"]["spec"],
            _ => continue,
        };
        for c in pod["containers"].as_array().unwrap() {
            images.push(deployment.effective_image(c["image"].as_str().unwrap()));
        }
    }
    assert!(images.len() >= 2, "{images:?}");
    for image in images {
        assert!(pinned(&image), "{image} is not pinned by version or digest");
    }
    assert!(pinned("r.io/a/b:0.1.0") && pinned("r.io/a/b@sha256:00"));
    assert!(!pinned("r.io/a/b") && !pinned("r.io/a/b:latest") && !pinned("host:5000/a"));
}

/// Addresses a call to a URL a user chose must never reach: loopback, the private ranges,
/// carrier-grade NAT, link-local (cloud metadata).
const PRIVATE_SAMPLES: [&str; 7] = [
    "127.0.0.1",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "100.64.0.1",
    "169.254.169.254",
    "0.0.0.1",
];

/// Whether a NetworkPolicy keeps pods with `labels` from every private address except on
/// named ports (the database rules, DNS).
fn egress_blocks_private(deployment: &Deployment, labels: &BTreeMap<String, String>) -> bool {
    deployment.of_kind("NetworkPolicy").any(|policy| {
        let spec = &policy["spec"];
        let selects = spec["podSelector"]["matchLabels"]
            .as_object()
            .is_some_and(|m| {
                m.iter()
                    .all(|(k, v)| labels.get(k).map(String::as_str) == v.as_str())
            });
        let egress = strings(&spec["policyTypes"]).contains(&"Egress".to_string());
        selects
            && egress
            && spec["egress"].as_array().unwrap().iter().all(|rule| {
                let ports_named = rule["ports"].as_array().is_some_and(|p| !p.is_empty());
                ports_named
                    || rule["to"].as_array().unwrap().iter().all(|peer| {
                        let block = &peer["ipBlock"];
                        let Some(cidr) = block["cidr"].as_str() else {
                            return false;
                        };
                        let net: ipnet::IpNet = cidr.parse().unwrap();
                        let except: Vec<ipnet::IpNet> = strings(&block["except"])
                            .iter()
                            .map(|e| e.parse().unwrap())
                            .collect();
                        PRIVATE_SAMPLES.iter().all(|ip| {
                            let ip: std::net::IpAddr = ip.parse().unwrap();
                            !net.contains(&ip) || except.iter().any(|e| e.contains(&ip))
                        })
                    })
            })
    })
}

#[test]
fn private_networks_are_closed_to_user_urls_and_open_to_the_apps_own_services() {
    let manifest = app_manifest();
    let deployment = Deployment::load();
    for part in deployment.parts() {
        let config = RuntimeConfig::load(&part.runtime_config)
            .unwrap_or_else(|e| panic!("{}: {e}", part.name));
        let blocked = BlockedNetworks::parse(&config.outbound_networking.block_networks)
            .unwrap_or_else(|e| panic!("{}: {e}", part.name));
        let hosts: Vec<&String> = part
            .components
            .iter()
            .flat_map(|c| &manifest.component[c].allowed_outbound_hosts)
            .collect();
        // A component that may call any host calls URLs users set (tools, collectors).
        let open = hosts.iter().any(|h| h.contains("://*"));
        // Spin applies block_networks to outbound Redis as to HTTP: a part that uses Redis or
        // hands steps to the API part's Service must reach those private addresses.
        let needs_private = hosts
            .iter()
            .any(|h| h.starts_with("redis://") || h.contains("{{ dispatch_url }}"));
        let config_blocks = PRIVATE_SAMPLES
            .iter()
            .all(|ip| blocked.blocks(ip.parse().unwrap()));
        if needs_private {
            assert!(
                blocked.is_empty(),
                "{}: block_networks would end its calls to Redis or the API's Service",
                part.name
            );
        }
        let egress_closed = egress_blocks_private(&deployment, &part.pod_labels);
        if open {
            assert!(
                config_blocks || egress_closed,
                "{}: calls user-set URLs with private networks open",
                part.name
            );
        }
        // The app calls a user's host name only where something resolving it refuses
        // private addresses: its runtime (probed), or the network, as the part declares.
        let declared = part
            .values
            .get("network_blocks_private")
            .map(String::as_str);
        if declared == Some("true") {
            assert!(
                egress_closed || config_blocks,
                "{}: declares private networks closed, and they are not",
                part.name
            );
        }
        if open && !config_blocks {
            assert_eq!(
                declared,
                Some("true"),
                "{}: closed by its NetworkPolicy only, so it must say so (network_blocks_private) \
                 or every URL naming a host is refused",
                part.name
            );
        }
        assert!(
            config.key_value_store.contains_key("default"),
            "{}: the key-value store is not shared between replicas",
            part.name
        );
    }
}

#[test]
fn parts_are_probed_where_they_answer() {
    let manifest = app_manifest();
    let deployment = Deployment::load();
    for app in deployment.of_kind("SpinApp") {
        let components = strings(&app["spec"]["components"]);
        let served: Vec<&str> = manifest
            .trigger
            .http
            .iter()
            .filter(|t| components.contains(&t.component))
            .filter_map(|t| match &t.route {
                RouteSpec::Path(p) => Some(p.as_str()),
                RouteSpec::Private { .. } => None,
            })
            .collect();
        let checks = &app["spec"]["checks"];
        let probed: Vec<&str> = ["liveness", "readiness"]
            .iter()
            .filter_map(|probe| checks[probe]["httpGet"]["path"].as_str())
            .collect();
        for path in &probed {
            assert!(
                served.contains(path),
                "{}: a probe on {path}, which the part does not serve",
                app["metadata"]["name"]
            );
        }
        // A part that serves HTTP is probed on liveness and on readiness.
        if components.iter().any(|c| c == "health") {
            assert_eq!(probed, ["/healthz", "/readyz"]);
        }
    }
}

#[test]
fn the_migration_job_runs_the_operators_tool_on_the_apps_database() {
    let deployment = Deployment::load();
    let job = deployment.of_kind("Job").next().expect("a migration Job");
    let container = &job["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&container["args"]);
    assert_eq!(args[0], "migrate", "{args:?}");
    // The image's migrations folder (infra/ops/Dockerfile copies migrations/ there).
    let dockerfile = std::fs::read_to_string(workspace().join("infra/ops/Dockerfile")).unwrap();
    let dir = &args[args.iter().position(|a| a == "--dir").unwrap() + 1];
    assert!(
        dockerfile.contains(&format!("COPY migrations {dir}")),
        "{dir}"
    );
    let env = &container["env"][0];
    assert_eq!(env["name"], "DATABASE_URL");
    assert_eq!(env["valueFrom"]["secretKeyRef"]["key"], "database_url");
}
