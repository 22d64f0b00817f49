//! `when` expressions: a small, side-effect-free language over the run input and ancestor
//! outputs, e.g. `steps.check.output.score >= 0.8 && !(input.dry_run == true)`.
//!
//! Grammar: `or := and ("||" and)*`, `and := not ("&&" not)*`, `not := "!" not | cmp`,
//! `cmp := operand (("=="|"!="|"<"|"<="|">"|">=") operand)?`,
//! `operand := "(" or ")" | number | 'string' | "string" | true | false | null | path`,
//! where a path is a template reference (`input.x`, `steps.key.output.y[0]`).

use serde_json::Value;

use crate::template::{self, Reference, Scope};

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Literal(Value),
    Path(Reference),
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
    Compare(Box<Expr>, Op, Box<Expr>),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Literal(Value),
    Path(String),
    Op(Op),
    And,
    Or,
    Not,
    Open,
    Close,
}

fn tokenize(src: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let two = |a: char, b: char| c == a && next == Some(b);
        let (token, len) = match c {
            _ if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => (Token::Open, 1),
            ')' => (Token::Close, 1),
            _ if two('&', '&') => (Token::And, 2),
            _ if two('|', '|') => (Token::Or, 2),
            _ if two('=', '=') => (Token::Op(Op::Eq), 2),
            _ if two('!', '=') => (Token::Op(Op::Ne), 2),
            _ if two('<', '=') => (Token::Op(Op::Le), 2),
            _ if two('>', '=') => (Token::Op(Op::Ge), 2),
            '<' => (Token::Op(Op::Lt), 1),
            '>' => (Token::Op(Op::Gt), 1),
            '!' => (Token::Not, 1),
            '\'' | '"' => {
                let mut s = String::new();
                let mut j = i + 1;
                loop {
                    match chars.get(j) {
                        None => return Err("an unclosed string".into()),
                        Some('\\') => {
                            s.push(*chars.get(j + 1).ok_or("an unclosed string")?);
                            j += 2;
                        }
                        Some(q) if *q == c => break,
                        Some(ch) => {
                            s.push(*ch);
                            j += 1;
                        }
                    }
                }
                (Token::Literal(Value::String(s)), j + 1 - i)
            }
            _ if c.is_ascii_digit() || (c == '-' && next.is_some_and(|n| n.is_ascii_digit())) => {
                let end = (i + 1..chars.len())
                    .find(|&j| {
                        !(chars[j].is_ascii_digit()
                            || chars[j] == '.'
                            || chars[j] == 'e'
                            || chars[j] == 'E')
                    })
                    .unwrap_or(chars.len());
                let text: String = chars[i..end].iter().collect();
                let n: f64 = text
                    .parse()
                    .map_err(|_| format!("`{text}` is not a number"))?;
                let value = serde_json::Number::from_f64(n)
                    .map(Value::Number)
                    .ok_or("not a finite number")?;
                (Token::Literal(value), end - i)
            }
            _ if c.is_ascii_alphabetic() || c == '_' => {
                let end = (i..chars.len())
                    .find(|&j| !(chars[j].is_ascii_alphanumeric() || "_.[]-".contains(chars[j])))
                    .unwrap_or(chars.len());
                let word: String = chars[i..end].iter().collect();
                let token = match word.as_str() {
                    "true" => Token::Literal(Value::Bool(true)),
                    "false" => Token::Literal(Value::Bool(false)),
                    "null" => Token::Literal(Value::Null),
                    _ => Token::Path(word),
                };
                (token, end - i)
            }
            _ => return Err(format!("unexpected `{c}`")),
        };
        out.push(token);
        i += len;
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn or(&mut self) -> Result<Expr, String> {
        let mut left = self.and()?;
        while self.peek() == Some(&Token::Or) {
            self.at += 1;
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, String> {
        let mut left = self.not()?;
        while self.peek() == Some(&Token::And) {
            self.at += 1;
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, String> {
        if self.peek() == Some(&Token::Not) {
            self.at += 1;
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.compare()
    }

    fn compare(&mut self) -> Result<Expr, String> {
        let left = self.operand()?;
        if let Some(Token::Op(op)) = self.peek().cloned() {
            self.at += 1;
            let right = self.operand()?;
            return Ok(Expr::Compare(Box::new(left), op, Box::new(right)));
        }
        Ok(left)
    }

    fn operand(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Token::Open) => {
                let inner = self.or()?;
                match self.next() {
                    Some(Token::Close) => Ok(inner),
                    _ => Err("a `(` is not closed".into()),
                }
            }
            Some(Token::Literal(v)) => Ok(Expr::Literal(v)),
            Some(Token::Path(p)) => Ok(Expr::Path(template::parse_reference(&p)?)),
            Some(t) => Err(format!("unexpected {t:?}")),
            None => Err("the expression ends too early".into()),
        }
    }
}

/// Parses an expression.
pub fn parse(src: &str) -> Result<Expr, String> {
    let mut p = Parser {
        tokens: tokenize(src)?,
        at: 0,
    };
    let expr = p.or()?;
    match p.peek() {
        None => Ok(expr),
        Some(t) => Err(format!("unexpected {t:?} after the expression")),
    }
}

impl Expr {
    /// Every path the expression reads.
    pub fn references(&self) -> Vec<&Reference> {
        match self {
            Expr::Literal(_) => vec![],
            Expr::Path(r) => vec![r],
            Expr::Not(e) => e.references(),
            Expr::And(a, b) | Expr::Or(a, b) | Expr::Compare(a, _, b) => {
                let mut v = a.references();
                v.extend(b.references());
                v
            }
        }
    }

    fn value(&self, scope: &impl Scope) -> Value {
        match self {
            Expr::Literal(v) => v.clone(),
            Expr::Path(r) => template::lookup(scope, r).cloned().unwrap_or(Value::Null),
            other => Value::Bool(other.eval(scope)),
        }
    }

    /// Evaluates to a boolean: `null`, `false`, `0`, `""` and missing paths are false.
    pub fn eval(&self, scope: &impl Scope) -> bool {
        match self {
            Expr::Not(e) => !e.eval(scope),
            Expr::And(a, b) => a.eval(scope) && b.eval(scope),
            Expr::Or(a, b) => a.eval(scope) || b.eval(scope),
            Expr::Compare(a, op, b) => compare(&a.value(scope), *op, &b.value(scope)),
            other => truthy(&other.value(scope)),
        }
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn compare(a: &Value, op: Op, b: &Value) -> bool {
    use std::cmp::Ordering;
    let ordering = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x
            .as_f64()
            .zip(y.as_f64())
            .and_then(|(x, y)| x.partial_cmp(&y)),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    };
    match op {
        // Numbers compare by value, so `1 == 1.0`.
        Op::Eq => ordering.map_or(a == b, |o| o == Ordering::Equal),
        Op::Ne => !ordering.map_or(a == b, |o| o == Ordering::Equal),
        Op::Lt => ordering == Some(Ordering::Less),
        Op::Le => matches!(ordering, Some(Ordering::Less | Ordering::Equal)),
        Op::Gt => ordering == Some(Ordering::Greater),
        Op::Ge => matches!(ordering, Some(Ordering::Greater | Ordering::Equal)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    use crate::template::testing::TestScope as S;

    fn eval(src: &str) -> bool {
        let scope = S(
            json!({"n": 3, "name": "ada", "dry": false, "tags": ["a"]}),
            json!({"check": {"score": 0.9, "ok": true}}),
        );
        parse(src)
            .unwrap_or_else(|e| panic!("{src}: {e}"))
            .eval(&scope)
    }

    #[test]
    fn comparisons_and_logic_evaluate_over_input_and_outputs() {
        assert!(eval("input.n == 3"));
        assert!(eval("input.n == 3.0 && input.name == 'ada'"));
        assert!(eval(
            "steps.check.output.score >= 0.8 && !(input.dry == true)"
        ));
        assert!(eval("input.n < 2 || steps.check.output.ok"));
        assert!(eval("input.tags[0] == \"a\""));
        assert!(!eval("input.missing"));
        assert!(!eval("input.missing > 1"));
        assert!(!eval("input.name > 3"));
        assert!(eval("input.name != null"));
        assert!(eval("-1 < input.n"));
        assert!(!eval("!input.tags"));
    }

    #[test]
    fn and_binds_tighter_than_or() {
        assert!(eval("true || false && false"));
        assert!(!eval("(true || false) && false"));
    }

    #[test]
    fn malformed_expressions_are_rejected() {
        for bad in [
            "",
            "input.n ==",
            "(input.n",
            "input.n = 3",
            "env.HOME",
            "'open",
            "input.n == 3 3",
            "a && && b",
            "1 # 2",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn references_are_listed_for_ancestor_checks() {
        let e = parse("steps.a.output.x == input.y || steps.b.output").unwrap();
        let sources: Vec<_> = e.references().iter().map(|r| r.source.clone()).collect();
        assert_eq!(
            sources,
            [
                template::Source::Step("a".into()),
                template::Source::Input,
                template::Source::Step("b".into())
            ]
        );
    }
}
