#![allow(unsafe_code)]

//! The run console (`/console/...`): serves the single-page app built by `build.rs`. Assets
//! have content-hashed names and are cached for a year; every other path under `/console`
//! is the app shell (the browser's router takes it from there), never cached. Every
//! answer carries a strict Content-Security-Policy: the page loads nothing but its own
//! assets and talks only to this origin's API.

use sparkops_platform::http::request_id;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
    gzip: &'static [u8],
}

const ASSETS: &[Asset] = include!(concat!(env!("OUT_DIR"), "/assets.rs"));
const SHELL: &str = include_str!(concat!(env!("OUT_DIR"), "/index.html"));

/// Scripts, styles, images and connections from this origin only; no inline script, no
/// framing, no plugins, forms post nowhere else.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     font-src 'self'; connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

const ASSET_PREFIX: &str = "/console/assets/";

/// What a path under `/console` answers.
enum Page {
    Asset(&'static Asset),
    MissingAsset,
    Shell,
    /// `/`: the console is the app's front page.
    Front,
}

fn page(path: &str) -> Page {
    if path == "/" {
        return Page::Front;
    }
    match path.strip_prefix(ASSET_PREFIX) {
        Some(name) => ASSETS
            .iter()
            .find(|a| a.name == name)
            .map_or(Page::MissingAsset, Page::Asset),
        None => Page::Shell,
    }
}

/// The shell's validator: it changes whenever the bundle does.
fn shell_etag() -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in SHELL.bytes() {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{hash:016x}\"")
}

fn accepts_gzip(req: &IncomingRequest) -> bool {
    req.headers().get("accept-encoding").iter().any(|v| {
        std::str::from_utf8(v).is_ok_and(|v| {
            v.split(',').any(|c| {
                let mut parts = c.split(';');
                parts
                    .next()
                    .is_some_and(|n| n.trim().eq_ignore_ascii_case("gzip"))
                    && !parts.any(|p| p.trim().replace(' ', "") == "q=0")
            })
        })
    })
}

fn header(req: &IncomingRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .first()
        .and_then(|v| std::str::from_utf8(v).ok())
        .map(str::to_string)
}

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    let id = request_id(header(&req, "x-request-id").as_deref());
    let full = req.path_with_query().unwrap_or_default();
    let path = full.split('?').next().unwrap_or_default();
    let head = matches!(req.method(), Method::Head);
    let mut answer = Response::builder();
    answer
        .header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("x-frame-options", "DENY")
        .header("x-request-id", id);
    if !matches!(req.method(), Method::Get | Method::Head) {
        return answer.status(405).header("allow", "GET, HEAD").build();
    }
    let (body, content_type): (&[u8], &str) = match page(path) {
        Page::Front => {
            return answer.status(302).header("location", "/console/").build();
        }
        Page::MissingAsset => {
            return answer
                .status(404)
                .header("cache-control", "no-store")
                .build();
        }
        Page::Asset(asset) => {
            let hashed = asset.name.starts_with("main-");
            answer.header(
                "cache-control",
                if hashed {
                    "public, max-age=31536000, immutable"
                } else {
                    "public, max-age=86400"
                },
            );
            answer.header("vary", "accept-encoding");
            if accepts_gzip(&req) {
                answer.header("content-encoding", "gzip");
                (asset.gzip, asset.content_type)
            } else {
                (asset.body, asset.content_type)
            }
        }
        Page::Shell => {
            let etag = shell_etag();
            answer
                .header("cache-control", "no-cache")
                .header("etag", &etag);
            if header(&req, "if-none-match").is_some_and(|v| v.split(',').any(|t| t.trim() == etag))
            {
                return answer.status(304).build();
            }
            (SHELL.as_bytes(), "text/html; charset=utf-8")
        }
    };
    answer
        .status(200)
        .header("content-type", content_type)
        .header("content-length", body.len().to_string());
    if head {
        return answer.build();
    }
    answer.body(body.to_vec()).build()
}
