//! OpenAI-compatible chat completions (`POST {base}/chat/completions`), the protocol every
//! provider of an agent speaks: providers from configuration, the request an agent's call
//! makes (messages, function tools, `max_tokens`, `response_format`), the answer read back
//! (content or tool calls, token usage), failures sorted into error kinds, and the cost of a
//! call from the price table. No I/O here.

use rust_decimal::Decimal;
use serde_json::{Value, json};

use crate::money::Usd;
use crate::status::ErrorKind;

/// A provider: its name (the `provider` of `provider/model`) and its API base URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Provider {
    pub name: String,
    pub base_url: String,
}

/// Parses the `model_providers` setting: `name=base_url` pairs separated by `;` or newlines,
/// e.g. `openai=https://api.openai.com/v1; local=http://127.0.0.1:8080/v1`.
pub fn parse_providers(spec: &str) -> Result<Vec<Provider>, String> {
    let mut out = Vec::new();
    for entry in spec
        .split([';', '\n'])
        .map(str::trim)
        .filter(|e| !e.is_empty())
    {
        let (name, url) = entry
            .split_once('=')
            .ok_or_else(|| format!("`{entry}` is not name=base_url"))?;
        let (name, url) = (name.trim(), url.trim().trim_end_matches('/'));
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(format!("`{name}` is not a provider name"));
        }
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(format!("provider {name}: `{url}` is not an http(s) URL"));
        }
        out.push(Provider {
            name: name.to_string(),
            base_url: url.to_string(),
        });
    }
    Ok(out)
}

/// Reads `name=value` pairs (the `model_provider_keys` secret), `;` or newline separated.
pub fn parse_keys(spec: &str) -> Vec<(String, String)> {
    spec.split([';', '\n'])
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect()
}

/// `provider/model` split at the first `/`.
pub fn split_model(model: &str) -> Option<(&str, &str)> {
    model
        .split_once('/')
        .filter(|(p, m)| !p.is_empty() && !m.is_empty())
}

/// A function tool offered to the model.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionTool {
    pub name: String,
    pub description: String,
    pub parameters: Value,
}

/// The body of one chat completions request.
pub fn chat_request(
    model: &str,
    messages: &[Value],
    tools: &[FunctionTool],
    max_tokens: u64,
    temperature: Option<f64>,
    response_format: Option<&Value>,
) -> Value {
    let mut body = json!({"model": model, "messages": messages, "max_tokens": max_tokens});
    if let Some(t) = temperature {
        body["temperature"] = json!(t);
    }
    if !tools.is_empty() {
        body["tools"] = tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters}})
            })
            .collect();
    }
    if let Some(schema) = response_format {
        body["response_format"] = json!({"type": "json_schema",
            "json_schema": {"name": "output", "schema": schema}});
    }
    body
}

/// [`chat_request`] streamed: the answer comes as Server-Sent Events, with the usage in a
/// final chunk.
pub fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

/// A tool call the model asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them (a JSON text, not yet trusted).
    pub arguments: String,
}

/// What one completion answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The assistant message, to send back with the tool results.
    pub message: Value,
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCall>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Whether the provider reported its usage; without it the tokens are estimates and
    /// the call is recorded as unpriced, never as free.
    pub usage_reported: bool,
}

impl Completion {
    /// Fills in estimates when the provider reported no usage: `prompt_estimate` for the
    /// prompt, the answer's length for the completion.
    pub fn estimate_missing_usage(&mut self, prompt_estimate: u64) {
        if self.usage_reported {
            return;
        }
        let answer = self.content.as_deref().map_or(0, str::len)
            + self
                .tool_calls
                .iter()
                .map(|c| c.name.len() + c.arguments.len())
                .sum::<usize>();
        self.prompt_tokens = prompt_estimate;
        self.completion_tokens = (answer as u64).div_ceil(3) + 1;
    }
}

/// Reads a chat completions answer.
pub fn parse_completion(body: &Value) -> Result<Completion, String> {
    let message = body["choices"][0]["message"].clone();
    if !message.is_object() {
        return Err("the answer has no choices[0].message".into());
    }
    let tool_calls = match message.get("tool_calls") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(calls)) => calls
            .iter()
            .map(|c| {
                Some(ToolCall {
                    id: c["id"].as_str()?.to_string(),
                    name: c["function"]["name"].as_str()?.to_string(),
                    arguments: c["function"]["arguments"]
                        .as_str()
                        .unwrap_or("{}")
                        .to_string(),
                })
            })
            .collect::<Option<Vec<_>>>()
            .ok_or("a tool call lacks its id or function name")?,
        Some(_) => return Err("tool_calls is not a list".into()),
    };
    let usage = &body["usage"];
    Ok(Completion {
        content: message["content"].as_str().map(str::to_string),
        message,
        tool_calls,
        prompt_tokens: usage["prompt_tokens"].as_u64().unwrap_or(0),
        completion_tokens: usage["completion_tokens"].as_u64().unwrap_or(0),
        usage_reported: usage["prompt_tokens"].is_u64(),
    })
}

/// Reads a streamed chat completion (`stream: true`: Server-Sent Events of
/// `chat.completion.chunk` objects, then `[DONE]`) as its bytes arrive: the text deltas as
/// they come, the tool calls assembled from their pieces, and the usage of the final chunk
/// (`stream_options.include_usage`), which a provider may leave out.
#[derive(Debug, Default)]
pub struct StreamReader {
    /// Bytes of the answer read so far, up to the end of the last whole event.
    consumed: usize,
    content: String,
    /// `(id, name, arguments)` by the provider's `index`.
    calls: Vec<(String, String, String)>,
    usage: Option<(u64, u64)>,
    error: Option<String>,
    done: bool,
}

impl StreamReader {
    /// Reads the whole events of `body` (the answer so far) not read before, and answers
    /// the text they add.
    pub fn feed(&mut self, body: &[u8]) -> String {
        let fresh = &body[self.consumed.min(body.len())..];
        let Some(end) = fresh.windows(2).rposition(|w| w == b"\n\n") else {
            return String::new();
        };
        self.consumed += end + 2;
        let text = String::from_utf8_lossy(&fresh[..end]).replace("\r\n", "\n");
        let mut added = String::new();
        for event in text.split("\n\n") {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if data.is_empty() {
                continue;
            }
            let data = data.join("\n");
            if data.trim() == "[DONE]" {
                self.done = true;
                continue;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            added += &self.chunk(&chunk);
        }
        added
    }

    fn chunk(&mut self, chunk: &Value) -> String {
        if let Some(error) = chunk.get("error") {
            self.error = Some(
                error["message"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| error.to_string()),
            );
        }
        if let Some(u) = chunk.get("usage").filter(|u| u["prompt_tokens"].is_u64()) {
            self.usage = Some((
                u["prompt_tokens"].as_u64().unwrap_or(0),
                u["completion_tokens"].as_u64().unwrap_or(0),
            ));
        }
        let delta = &chunk["choices"][0]["delta"];
        for piece in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = piece["index"].as_u64().unwrap_or(0).min(127) as usize;
            if self.calls.len() <= index {
                self.calls.resize(index + 1, Default::default());
            }
            let call = &mut self.calls[index];
            if let Some(id) = piece["id"].as_str() {
                call.0 = id.to_string();
            }
            if let Some(name) = piece["function"]["name"].as_str() {
                call.1 += name;
            }
            if let Some(args) = piece["function"]["arguments"].as_str() {
                call.2 += args;
            }
        }
        let text = delta["content"].as_str().unwrap_or_default();
        self.content += text;
        text.to_string()
    }

    /// The completion the stream carried, once it has ended.
    pub fn finish(mut self, body: &[u8]) -> Result<Completion, String> {
        let mut whole = body.to_vec();
        whole.extend_from_slice(b"\n\n");
        self.feed(&whole);
        if let Some(e) = self.error {
            return Err(format!("the stream carried an error: {e}"));
        }
        if !self.done && self.usage.is_none() && self.content.is_empty() && self.calls.is_empty() {
            return Err("the stream carried no completion".into());
        }
        let calls: Vec<ToolCall> = self
            .calls
            .into_iter()
            .filter(|(id, name, _)| !id.is_empty() && !name.is_empty())
            .map(|(id, name, arguments)| ToolCall {
                id,
                name,
                arguments: if arguments.is_empty() {
                    "{}".into()
                } else {
                    arguments
                },
            })
            .collect();
        let content = Some(self.content).filter(|c| !c.is_empty() || calls.is_empty());
        let mut message = json!({"role": "assistant", "content": content});
        if !calls.is_empty() {
            message["tool_calls"] = calls
                .iter()
                .map(|c| {
                    json!({"id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})
                })
                .collect();
        }
        let (prompt_tokens, completion_tokens) = self.usage.unwrap_or((0, 0));
        Ok(Completion {
            message,
            content,
            tool_calls: calls,
            prompt_tokens,
            completion_tokens,
            usage_reported: self.usage.is_some(),
        })
    }
}

/// A rough count of the tokens `messages` and `tools` cost as a prompt: four characters a
/// token plus a little per message. It only sizes the budget reservation, which is settled
/// to the provider's own count afterwards, so it errs high.
pub fn estimate_prompt_tokens(messages: &[Value], tools: &[FunctionTool]) -> u64 {
    let text: usize = messages.iter().map(|m| m.to_string().len()).sum::<usize>()
        + tools
            .iter()
            .map(|t| t.name.len() + t.description.len() + t.parameters.to_string().len())
            .sum::<usize>();
    (text as u64).div_ceil(3) + 8 * messages.len() as u64 + 16
}

/// The error kind of a provider's refusal, and how long it asked to wait (`Retry-After`,
/// seconds or an HTTP date is not parsed: seconds only).
pub fn classify(status: u16, retry_after: Option<&str>) -> (ErrorKind, Option<u64>) {
    let wait = retry_after
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| (s * 1000.0).min(3_600_000.0) as u64);
    match status {
        429 => (ErrorKind::RateLimited, wait),
        408 => (ErrorKind::Timeout, wait),
        500..=599 => (ErrorKind::ProviderError, wait),
        // The request itself is wrong (bad model, bad key, too long): trying again is the same.
        _ => (ErrorKind::Validation, None),
    }
}

/// Whether an error answer says the prompt does not fit the model's context (OpenAI's
/// `context_length_exceeded`, or the wording providers use): another model, with a longer
/// context, may take it.
pub fn is_context_length_refusal(status: u16, body: &[u8]) -> bool {
    if !(400..500).contains(&status) {
        return false;
    }
    let text = String::from_utf8_lossy(body).to_ascii_lowercase();
    text.contains("context_length_exceeded")
        || text.contains("maximum context length")
        || text.contains("context window")
}

/// The most one agent step can cost (a quote): every attempt runs every iteration; each
/// call's prompt is `base_prompt` plus every earlier answer at `max_tokens` (tool results
/// are not counted: they are unknown before the run); each answer is `max_tokens` long and
/// priced at the dearest of `prices` (the model and its fallbacks).
pub fn worst_case(
    prices: &[Price],
    base_prompt: u64,
    max_tokens: u64,
    iterations: u64,
    attempts: u64,
) -> Usd {
    let per_attempt = (0..iterations)
        .map(|i| {
            let prompt = base_prompt + i * max_tokens;
            prices
                .iter()
                .map(|p| p.ceiling(prompt, max_tokens))
                .max()
                .unwrap_or(Usd::ZERO)
        })
        .fold(Usd::ZERO, |sum, call| sum + call);
    Usd::from(per_attempt.decimal() * Decimal::from(attempts))
}

/// A model's prices, USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input_per_mtok: Usd,
    pub output_per_mtok: Usd,
}

impl Price {
    /// The cost of a call, rounded half away from zero to the micro-dollar.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> Usd {
        self.exact(prompt_tokens, completion_tokens)
            .round_dp_with_strategy(6, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
            .into()
    }

    /// The most a call can cost, rounded up to the micro-dollar (for reservations).
    pub fn ceiling(&self, prompt_tokens: u64, completion_tokens: u64) -> Usd {
        self.exact(prompt_tokens, completion_tokens)
            .round_dp_with_strategy(6, rust_decimal::RoundingStrategy::AwayFromZero)
            .into()
    }

    fn exact(&self, prompt_tokens: u64, completion_tokens: u64) -> Decimal {
        let million = Decimal::from(1_000_000u64);
        (self.input_per_mtok.decimal() * Decimal::from(prompt_tokens)
            + self.output_per_mtok.decimal() * Decimal::from(completion_tokens))
            / million
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(delta: Value) -> String {
        format!(
            "data: {}\n\n",
            json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]})
        )
    }

    #[test]
    fn a_stream_yields_its_text_as_it_comes_and_its_usage_at_the_end() {
        let mut body = String::new();
        let mut reader = StreamReader::default();
        body += &chunk(json!({"role": "assistant", "content": "Hel"}));
        // Half an event is not read until its end arrives.
        body += "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"lo\"}}]}";
        assert_eq!(reader.feed(body.as_bytes()), "Hel");
        body += "\n\n";
        assert_eq!(reader.feed(body.as_bytes()), "lo");
        assert_eq!(reader.feed(body.as_bytes()), "");
        body += "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n";
        assert_eq!(reader.feed(body.as_bytes()), "");
        let c = reader.finish(body.as_bytes()).unwrap();
        assert_eq!(c.content.as_deref(), Some("Hello"));
        assert_eq!(
            (c.prompt_tokens, c.completion_tokens, c.usage_reported),
            (12, 2, true)
        );
        assert_eq!(c.message, json!({"role": "assistant", "content": "Hello"}));
    }

    #[test]
    fn streamed_tool_calls_are_assembled_and_missing_usage_is_estimated_not_zero() {
        let body = [
            chunk(json!({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "weather", "arguments": ""}}]})),
            chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]})),
            chunk(json!({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "time", "arguments": "{}"}}]})),
            chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]})),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        let mut reader = StreamReader::default();
        assert_eq!(reader.feed(body.as_bytes()), "");
        let mut c = reader.finish(body.as_bytes()).unwrap();
        assert_eq!(
            c.tool_calls,
            [
                ToolCall {
                    id: "c1".into(),
                    name: "weather".into(),
                    arguments: "{\"city\":\"Oslo\"}".into()
                },
                ToolCall {
                    id: "c2".into(),
                    name: "time".into(),
                    arguments: "{}".into()
                },
            ]
        );
        assert_eq!(
            c.message["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Oslo\"}"
        );
        assert!(!c.usage_reported);
        c.estimate_missing_usage(40);
        assert_eq!(c.prompt_tokens, 40);
        assert!(c.completion_tokens > 0);
    }

    #[test]
    fn a_stream_with_an_error_or_nothing_in_it_is_no_completion() {
        let body = "data: {\"error\":{\"message\":\"overloaded\"}}\n\n";
        let mut reader = StreamReader::default();
        reader.feed(body.as_bytes());
        assert!(
            reader
                .finish(body.as_bytes())
                .unwrap_err()
                .contains("overloaded")
        );
        assert!(StreamReader::default().finish(b"").is_err());
        // A last event without its blank line is still read at the end.
        let cut = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}";
        let c = StreamReader::default().finish(cut.as_bytes()).unwrap();
        assert_eq!(c.content.as_deref(), Some("x"));
    }

    #[test]
    fn providers_and_keys_parse_and_bad_entries_are_named() {
        let p =
            parse_providers("openai=https://api.openai.com/v1/; local = http://127.0.0.1:9/v1\n")
                .unwrap();
        assert_eq!(
            p,
            vec![
                Provider {
                    name: "openai".into(),
                    base_url: "https://api.openai.com/v1".into()
                },
                Provider {
                    name: "local".into(),
                    base_url: "http://127.0.0.1:9/v1".into()
                },
            ]
        );
        assert!(
            parse_providers("openai")
                .unwrap_err()
                .contains("name=base_url")
        );
        assert!(
            parse_providers("x=ftp://a")
                .unwrap_err()
                .contains("not an http")
        );
        assert_eq!(
            parse_keys("openai=sk-1; local=; =x;groq = gk"),
            vec![
                ("openai".into(), "sk-1".into()),
                ("groq".into(), "gk".into())
            ]
        );
        assert_eq!(split_model("openai/gpt-4o"), Some(("openai", "gpt-4o")));
        assert_eq!(split_model("gpt-4o"), None);
    }

    #[test]
    fn a_request_offers_function_tools_and_a_json_schema_format() {
        let tools = [FunctionTool {
            name: "weather".into(),
            description: "w".into(),
            parameters: json!({"type": "object"}),
        }];
        let body = chat_request(
            "gpt-4o",
            &[json!({"role": "user", "content": "hi"})],
            &tools,
            100,
            Some(0.2),
            Some(&json!({"type": "object"})),
        );
        assert_eq!(body["tools"][0]["function"]["name"], "weather");
        assert_eq!(body["tools"][0]["type"], "function");
        assert_eq!(body["response_format"]["type"], "json_schema");
        assert_eq!(body["max_tokens"], 100);
        let bare = chat_request("m", &[], &[], 5, None, None);
        assert!(bare.get("tools").is_none() && bare.get("temperature").is_none());
    }

    #[test]
    fn answers_with_tool_calls_content_and_usage_are_read() {
        let body = json!({"choices": [{"message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 7}});
        let c = parse_completion(&body).unwrap();
        assert_eq!(c.tool_calls[0].name, "weather");
        assert_eq!(c.tool_calls[0].arguments, "{\"city\":\"Oslo\"}");
        assert_eq!(
            (c.prompt_tokens, c.completion_tokens, c.content),
            (12, 7, None)
        );
        assert!(parse_completion(&json!({"choices": []})).is_err());
    }

    #[test]
    fn refusals_are_sorted_into_retryable_kinds_and_retry_after_is_read() {
        assert_eq!(
            classify(429, Some("2")),
            (ErrorKind::RateLimited, Some(2000))
        );
        assert_eq!(classify(503, None), (ErrorKind::ProviderError, None));
        assert_eq!(classify(400, Some("5")), (ErrorKind::Validation, None));
        assert_eq!(classify(401, None).0, ErrorKind::Validation);
    }

    #[test]
    fn costs_are_exact_decimals_and_reservations_round_up() {
        let price = Price {
            input_per_mtok: Usd::parse("0.15").unwrap(),
            output_per_mtok: Usd::parse("0.60").unwrap(),
        };
        // 123 * 0.15 / 1e6 = 0.00001845; 10 * 0.6 / 1e6 = 0.000006 -> 0.00002445
        assert_eq!(price.cost(123, 10).to_fixed(), "0.000024");
        assert_eq!(price.ceiling(123, 10).to_fixed(), "0.000025");
        assert_eq!(price.cost(1_000_000, 1_000_000).to_fixed(), "0.750000");
    }

    #[test]
    fn context_length_refusals_are_told_from_other_errors() {
        let openai = br#"{"error": {"message": "This model's maximum context length is 8192 tokens.", "type": "invalid_request_error", "code": "context_length_exceeded"}}"#;
        assert!(is_context_length_refusal(400, openai));
        assert!(!is_context_length_refusal(
            400,
            br#"{"error": {"code": "invalid_api_key"}}"#
        ));
        assert!(!is_context_length_refusal(500, openai));
    }

    #[test]
    fn a_worst_case_quote_is_every_attempt_of_every_iteration_at_the_dearest_model() {
        let usd = |s: &str| Usd::parse(s).unwrap();
        let cheap = Price {
            input_per_mtok: usd("1"),
            output_per_mtok: usd("2"),
        };
        let dear = Price {
            input_per_mtok: usd("2"),
            output_per_mtok: usd("4"),
        };
        // Iteration 1: 1000 in + 100 out = 0.0012; iteration 2: 1100 in + 100 out = 0.0013;
        // three attempts: 0.0075.
        assert_eq!(worst_case(&[cheap], 1000, 100, 2, 3), usd("0.0075"));
        // The dearer fallback doubles every call.
        assert_eq!(worst_case(&[cheap, dear], 1000, 100, 2, 3), usd("0.015"));
        assert_eq!(worst_case(&[], 1000, 100, 2, 3), Usd::ZERO);
    }
}
