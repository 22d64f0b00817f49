//! Spin's HTTP routing: exact routes, `:name` segments and a trailing `/...` wildcard; the
//! most specific route wins (more fixed segments, then exact over wildcard, then literal
//! over parameter). Duplicate routes are a start-up error, as in Spin.

use anyhow::{Result, bail};

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Debug, Clone)]
pub struct Route {
    /// The route as written in the manifest, e.g. `/api/...`.
    pub raw: String,
    pub component: String,
    segments: Vec<Segment>,
    wildcard: bool,
}

/// The outcome of routing one path.
#[derive(Debug, PartialEq)]
pub struct Match<'a> {
    pub component: &'a str,
    pub raw_route: &'a str,
    /// The route without its `/...` tail (`spin-component-route`).
    pub component_route: String,
    /// The part of the path the wildcard matched (`spin-path-info`), `""` for exact routes.
    pub path_info: String,
    pub params: Vec<(String, String)>,
}

impl Route {
    pub fn parse(raw: &str, component: &str) -> Result<Self> {
        if !raw.starts_with('/') {
            bail!("route `{raw}` must start with `/`");
        }
        let (body, wildcard) = match raw.strip_suffix("/...") {
            Some(b) => (b, true),
            None if raw == "/..." => ("", true),
            None => (raw.trim_end_matches('/'), false),
        };
        let mut segments = Vec::new();
        for s in body.split('/').filter(|s| !s.is_empty()) {
            if s.contains("...") {
                bail!("route `{raw}`: `...` may only end a route");
            }
            segments.push(match s.strip_prefix(':') {
                Some("") => bail!("route `{raw}`: a `:` segment needs a name"),
                Some(name) => Segment::Param(name.to_string()),
                None => Segment::Literal(s.to_string()),
            });
        }
        Ok(Self {
            raw: raw.to_string(),
            component: component.to_string(),
            segments,
            wildcard,
        })
    }

    fn rank(&self) -> (usize, bool, usize) {
        let literals = self
            .segments
            .iter()
            .filter(|s| matches!(s, Segment::Literal(_)))
            .count();
        (self.segments.len(), !self.wildcard, literals)
    }

    fn shape(&self) -> (Vec<Option<&str>>, bool) {
        let shape = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => Some(l.as_str()),
                Segment::Param(_) => None,
            })
            .collect();
        (shape, self.wildcard)
    }

    fn matches(&self, path: &str) -> Option<Match<'_>> {
        let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        if parts.len() < self.segments.len()
            || (!self.wildcard && parts.len() != self.segments.len())
        {
            return None;
        }
        let mut params = Vec::new();
        for (seg, part) in self.segments.iter().zip(&parts) {
            match seg {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(name) => params.push((name.clone(), (*part).to_string())),
            }
        }
        let rest = &parts[self.segments.len()..];
        let path_info = if self.wildcard && !rest.is_empty() {
            let mut info = format!("/{}", rest.join("/"));
            if path.ends_with('/') {
                info.push('/');
            }
            info
        } else {
            String::new()
        };
        let component_route = self
            .raw
            .strip_suffix("/...")
            .unwrap_or(&self.raw)
            .to_string();
        Some(Match {
            component: &self.component,
            raw_route: &self.raw,
            component_route,
            path_info,
            params,
        })
    }
}

#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub fn new(mut routes: Vec<Route>) -> Result<Self> {
        routes.sort_by_key(|r| std::cmp::Reverse(r.rank()));
        for (i, a) in routes.iter().enumerate() {
            if let Some(b) = routes[i + 1..].iter().find(|b| b.shape() == a.shape()) {
                bail!(
                    "duplicate routes: `{}` (component `{}`) and `{}` (component `{}`)",
                    a.raw,
                    a.component,
                    b.raw,
                    b.component
                );
            }
        }
        Ok(Self { routes })
    }

    pub fn route(&self, path: &str) -> Option<Match<'_>> {
        self.routes.iter().find_map(|r| r.matches(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(routes: &[(&str, &str)]) -> Router {
        Router::new(
            routes
                .iter()
                .map(|(r, c)| Route::parse(r, c).unwrap())
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn the_longest_prefix_wins() {
        let r = router(&[("/...", "root"), ("/api/...", "api"), ("/api/v1/...", "v1")]);
        assert_eq!(r.route("/api/v1/runs").unwrap().component, "v1");
        assert_eq!(r.route("/api/v2").unwrap().component, "api");
        assert_eq!(r.route("/other").unwrap().component, "root");
        assert_eq!(r.route("/api/v1/runs/x").unwrap().path_info, "/runs/x");
    }

    #[test]
    fn exact_beats_wildcard_and_literal_beats_parameter() {
        let r = router(&[
            ("/users/...", "wild"),
            ("/users/:id", "param"),
            ("/users/me", "me"),
        ]);
        assert_eq!(r.route("/users/me").unwrap().component, "me");
        let m = r.route("/users/42").unwrap();
        assert_eq!(
            (m.component, m.params.clone()),
            ("param", vec![("id".into(), "42".into())])
        );
        assert_eq!(r.route("/users/42/keys").unwrap().component, "wild");
        assert_eq!(r.route("/users").unwrap().component, "wild");
    }

    #[test]
    fn an_exact_route_does_not_match_longer_paths() {
        let r = router(&[("/healthz", "health")]);
        assert!(r.route("/healthz").is_some());
        assert!(r.route("/healthz/x").is_none());
        assert!(r.route("/health").is_none());
    }

    #[test]
    fn duplicate_routes_are_refused() {
        let routes = vec![
            Route::parse("/a/:x", "one").unwrap(),
            Route::parse("/a/:y", "two").unwrap(),
        ];
        assert!(Router::new(routes).is_err());
    }
}
