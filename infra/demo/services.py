#!/usr/bin/env python3
"""The local demo's third parties, on loopback, so `infra/dev up` runs a demo offline.

- POST /v1/chat/completions: an OpenAI-compatible model ("demo/..."): it answers with a
  short digest of the last user message and reports usage, as a provider does.
- POST /search: a search service for the demo's tool: a few fixed results for the query.

Usage: services.py PORT. Standard library only; every answer carries a Content-Length.
"""

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_completion(request):
    messages = request.get("messages") or []
    last_user = next(
        (m.get("content") for m in reversed(messages) if m.get("role") == "user"), ""
    )
    if not isinstance(last_user, str):
        last_user = json.dumps(last_user)
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in messages)
    answer = "Demo digest: " + " ".join(last_user.split()[:40])
    completion_words = len(answer.split())
    return {
        "id": f"chatcmpl-demo-{time.time_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "demo"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt_words,
            "completion_tokens": completion_words,
            "total_tokens": prompt_words + completion_words,
        },
    }


def search(request):
    query = str(request.get("query", ""))
    return {
        "query": query,
        "results": [
            {"title": f"{query}: an overview", "url": "https://example.org/overview"},
            {"title": f"{query} in production", "url": "https://example.org/production"},
            {"title": f"What changed in {query} this year", "url": "https://example.org/news"},
        ],
    }


class Handler(BaseHTTPRequestHandler):
    routes = {"/v1/chat/completions": chat_completion, "/search": search}

    def do_POST(self):
        route = self.routes.get(self.path)
        if route is None:
            return self.answer(404, {"error": {"message": "not found"}})
        length = int(self.headers.get("Content-Length") or 0)
        try:
            request = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            return self.answer(400, {"error": {"message": "the body is not JSON"}})
        self.answer(200, route(request))

    def do_GET(self):
        self.answer(200, {"status": "ok"}) if self.path == "/healthz" else self.answer(404, {})

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
