//! Step-input templates: JSON whose strings may hold `{{ input.x }}` or
//! `{{ steps.key.output.y[0] }}`. A string that is exactly one template takes the referenced
//! JSON value as is (typed); otherwise each template is interpolated as text. Paths are plain
//! field and index access: no code runs.

use serde_json::Value;

/// Where a template reads from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Input,
    /// A step's output, by step key.
    Step(String),
}

/// One `{{ ... }}` reference: its source and the path inside it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub source: Source,
    pub path: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Segment {
    Field(String),
    Index(usize),
}

/// Parses the expression inside `{{ }}`: `input(.a|[0])*` or `steps.<key>.output(.a|[0])*`.
pub fn parse_reference(expr: &str) -> Result<Reference, String> {
    let segments = parse_path(expr.trim())?;
    let mut it = segments.into_iter();
    let source = match it.next() {
        Some(Segment::Field(f)) if f == "input" => Source::Input,
        Some(Segment::Field(f)) if f == "steps" => {
            let key = match it.next() {
                Some(Segment::Field(k)) => k,
                _ => return Err(format!("`{expr}`: expected steps.<key>.output")),
            };
            match it.next() {
                Some(Segment::Field(o)) if o == "output" => Source::Step(key),
                _ => return Err(format!("`{expr}`: expected steps.{key}.output")),
            }
        }
        _ => {
            return Err(format!(
                "`{expr}`: a template reads `input...` or `steps.<key>.output...`"
            ));
        }
    };
    Ok(Reference {
        source,
        path: it.collect(),
    })
}

fn parse_path(expr: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    let mut rest = expr;
    if rest.is_empty() {
        return Err("an empty template".into());
    }
    loop {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let name = &rest[..end];
        if !name.is_empty() {
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(format!("`{expr}`: `{name}` is not a field name"));
            }
            out.push(Segment::Field(name.to_string()));
        } else if out.is_empty() || rest.starts_with('.') {
            return Err(format!("`{expr}`: an empty field name"));
        }
        rest = &rest[end..];
        while let Some(after) = rest.strip_prefix('[') {
            let close = after
                .find(']')
                .ok_or_else(|| format!("`{expr}`: unclosed `[`"))?;
            let index = after[..close]
                .trim()
                .parse::<usize>()
                .map_err(|_| format!("`{expr}`: `[{}]` is not an index", &after[..close]))?;
            out.push(Segment::Index(index));
            rest = &after[close + 1..];
        }
        match rest.strip_prefix('.') {
            Some(r) if !r.is_empty() => rest = r,
            Some(_) => return Err(format!("`{expr}`: a path cannot end with `.`")),
            None if rest.is_empty() => return Ok(out),
            None => return Err(format!("`{expr}`: unexpected `{rest}`")),
        }
    }
}

/// The `{{ }}` expressions of one string.
fn expressions(s: &str) -> Result<Vec<(usize, usize, &str)>, String> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(start) = s[from..].find("{{").map(|i| i + from) {
        let end = s[start..]
            .find("}}")
            .map(|i| i + start)
            .ok_or("an unclosed `{{`")?;
        out.push((start, end + 2, &s[start + 2..end]));
        from = end + 2;
    }
    Ok(out)
}

/// A problem at a JSON path of a template: `(path, message)`.
pub type PathError = (String, String);

/// Every reference in a template, with the JSON path (`input.body.text`) of the string
/// that holds it; errors carry the same path.
pub fn references(template: &Value) -> Result<Vec<(String, Reference)>, Vec<PathError>> {
    let mut refs = Vec::new();
    let mut errors = Vec::new();
    walk(
        template,
        String::new(),
        &mut |path, s| match expressions(s) {
            Ok(exprs) => {
                for (_, _, e) in exprs {
                    match parse_reference(e) {
                        Ok(r) => refs.push((path.to_string(), r)),
                        Err(m) => errors.push((path.to_string(), m)),
                    }
                }
            }
            Err(m) => errors.push((path.to_string(), m)),
        },
    );
    if errors.is_empty() {
        Ok(refs)
    } else {
        Err(errors)
    }
}

fn walk(v: &Value, path: String, f: &mut impl FnMut(&str, &str)) {
    match v {
        Value::String(s) => f(&path, s),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, format!("{path}[{i}]"), f);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                walk(item, p, f);
            }
        }
        _ => {}
    }
}

/// What templates read: the run input and finished steps' outputs.
pub trait Scope {
    fn input(&self) -> &Value;
    fn output(&self, step: &str) -> Option<&Value>;
}

/// Looks a reference up; a missing field is `null`, as in JSONPath.
pub fn lookup<'a>(scope: &'a impl Scope, r: &Reference) -> Option<&'a Value> {
    let mut v = match &r.source {
        Source::Input => scope.input(),
        Source::Step(k) => scope.output(k)?,
    };
    for seg in &r.path {
        v = match seg {
            Segment::Field(f) => v.get(f)?,
            Segment::Index(i) => v.get(*i)?,
        };
    }
    Some(v)
}

/// Renders a template against `scope`.
pub fn render(template: &Value, scope: &impl Scope) -> Result<Value, String> {
    render_by(template, &|e| {
        Ok(lookup(scope, &parse_reference(e)?).cloned())
    })
}

/// Renders a template whose references are paths into one document from its top, each
/// starting with one of `roots`: a trigger's `{{ body.pull_request.title }}` or
/// `{{ headers.x-github-event }}`. A missing field is `null`.
pub fn render_document(template: &Value, doc: &Value, roots: &[&str]) -> Result<Value, String> {
    render_by(template, &|e| {
        let path = document_path(e, roots)?;
        let mut v = doc;
        for seg in &path {
            let next = match seg {
                Segment::Field(f) => v.get(f),
                Segment::Index(i) => v.get(*i),
            };
            match next {
                Some(n) => v = n,
                None => return Ok(None),
            }
        }
        Ok(Some(v.clone()))
    })
}

/// Every problem of a [`render_document`] template, with the JSON path of its string.
pub fn check_document(template: &Value, roots: &[&str]) -> Result<(), Vec<PathError>> {
    let mut errors = Vec::new();
    walk(
        template,
        String::new(),
        &mut |path, s| match expressions(s) {
            Ok(exprs) => {
                for (_, _, e) in exprs {
                    if let Err(m) = document_path(e, roots) {
                        errors.push((path.to_string(), m));
                    }
                }
            }
            Err(m) => errors.push((path.to_string(), m)),
        },
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

fn document_path(expr: &str, roots: &[&str]) -> Result<Vec<Segment>, String> {
    let path = parse_path(expr.trim())?;
    match path.first() {
        Some(Segment::Field(f)) if roots.contains(&f.as_str()) => Ok(path),
        _ => Err(format!(
            "`{}`: a template here reads {}",
            expr.trim(),
            roots
                .iter()
                .map(|r| format!("`{r}...`"))
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

/// Renders a template, `resolve` giving each `{{ }}` expression's value (`None`: missing).
fn render_by(
    template: &Value,
    resolve: &dyn Fn(&str) -> Result<Option<Value>, String>,
) -> Result<Value, String> {
    Ok(match template {
        Value::String(s) => {
            let exprs = expressions(s)?;
            match exprs.as_slice() {
                [] => Value::String(s.clone()),
                [(0, end, e)] if *end == s.len() => resolve(e)?.unwrap_or(Value::Null),
                _ => {
                    let mut out = String::new();
                    let mut last = 0;
                    for (start, end, e) in exprs {
                        out.push_str(&s[last..start]);
                        match resolve(e)? {
                            Some(Value::String(text)) => out.push_str(&text),
                            Some(Value::Null) | None => {}
                            Some(other) => out.push_str(&other.to_string()),
                        }
                        last = end;
                    }
                    out.push_str(&s[last..]);
                    Value::String(out)
                }
            }
        }
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|i| render_by(i, resolve))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_by(v, resolve)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// A scope of plain values for unit tests: the input, and outputs by step key.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) struct TestScope(pub Value, pub Value);

    impl Scope for TestScope {
        fn input(&self) -> &Value {
            &self.0
        }
        fn output(&self, step: &str) -> Option<&Value> {
            self.1.get(step)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use super::testing::TestScope as S;

    #[test]
    fn references_parse_sources_and_paths() {
        let r = parse_reference(" steps.fetch.output.items[2].title ").unwrap();
        assert_eq!(r.source, Source::Step("fetch".into()));
        assert_eq!(
            r.path,
            vec![
                Segment::Field("items".into()),
                Segment::Index(2),
                Segment::Field("title".into())
            ]
        );
        assert_eq!(parse_reference("input").unwrap().path, vec![]);
        for bad in [
            "",
            "env.HOME",
            "steps.fetch",
            "steps.fetch.result",
            "input..a",
            "input.a.",
            "input[x]",
            "input.a b",
            "input.a[1",
        ] {
            assert!(parse_reference(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn references_report_the_path_of_their_string() {
        let t = json!({"q": "{{ input.query }}", "ctx": ["x", "a {{ steps.s1.output.text }} b"], "n": 3});
        let refs = references(&t).unwrap();
        let got: Vec<(&str, &Source)> = refs.iter().map(|(p, r)| (p.as_str(), &r.source)).collect();
        assert_eq!(
            got,
            [
                ("ctx[1]", &Source::Step("s1".into())),
                ("q", &Source::Input)
            ]
        );
        let errors = references(&json!({"a": {"b": "{{ nope }}"}, "c": "{{ input"})).unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["a.b", "c"]);
    }

    #[test]
    fn a_whole_string_template_keeps_its_type_and_others_interpolate() {
        let scope = S(
            json!({"n": 3, "name": "ada"}),
            json!({"s1": {"tags": ["x", "y"]}}),
        );
        let out = render(
            &json!({"n": "{{ input.n }}", "tags": "{{ steps.s1.output.tags }}", "msg": "hi {{ input.name }} #{{ input.n }}", "missing": "{{ input.nope }}"}),
            &scope,
        )
        .unwrap();
        assert_eq!(
            out,
            json!({"n": 3, "tags": ["x", "y"], "msg": "hi ada #3", "missing": null})
        );
    }

    #[test]
    fn document_templates_read_their_roots_typed_or_as_text() {
        let doc =
            json!({"body": {"pr": {"title": "Fix", "number": 7}}, "headers": {"x-event": "push"}});
        let t = json!({"title": "{{ body.pr.title }}", "n": "{{ body.pr.number }}",
            "what": "{{ headers.x-event }} #{{ body.pr.number }}", "gone": "{{ body.nope.deeper }}"});
        assert_eq!(
            render_document(&t, &doc, &["body", "headers"]).unwrap(),
            json!({"title": "Fix", "n": 7, "what": "push #7", "gone": null})
        );
        assert!(check_document(&t, &["body", "headers"]).is_ok());
        let errors =
            check_document(&json!({"a": ["{{ input.x }}"]}), &["body", "headers"]).unwrap_err();
        assert_eq!(errors[0].0, "a[0]");
        assert!(
            errors[0].1.contains("`body...` or `headers...`"),
            "{errors:?}"
        );
    }
}
