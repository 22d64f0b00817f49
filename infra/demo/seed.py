#!/usr/bin/env python3
"""Seeds the local demo through the public API and runs it once, offline.

Usage: seed.py APP_URL SERVICES_URL DATA_DIR

An account demo@sparkops.local (its password kept in DATA_DIR/demo_password), a "Demo"
project with a search tool and a summarising agent (both served by services.py on
loopback), a two-step workflow, and one run of it, waited for and reported. Running it
again reuses what is there and starts one more run.
"""

import json
import secrets
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

EMAIL = "demo@sparkops.local"


class Api:
    def __init__(self, base):
        self.base = base.rstrip("/")
        self.token = None

    def call(self, method, path, body=None, ok=(200, 201)):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read()
        answer = json.loads(text) if text else None
        if status not in ok:
            raise SystemExit(f"demo: {method} {path} answered {status}: {answer}")
        return status, answer

    def find_or_create(self, path, project_id, name, body):
        _, page = self.call("GET", f"{path}?project_id={project_id}&limit=100")
        for item in page.get("items", []):
            if item.get("name") == name:
                return item["id"]
        _, created = self.call("POST", path, {"project_id": project_id, "name": name, **body})
        return created["id"]


def password(data_dir):
    path = Path(data_dir) / "demo_password"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(18))
        path.chmod(0o600)
    return path.read_text().strip()


def main(app_url, services_url, data_dir):
    api = Api(app_url)
    pw = password(data_dir)
    status, tokens = api.call(
        "POST", "/api/v1/auth/register", {"email": EMAIL, "password": pw, "name": "Demo"},
        ok=(201, 409),
    )
    if status == 409:
        _, tokens = api.call("POST", "/api/v1/auth/login", {"email": EMAIL, "password": pw})
    api.token = tokens["access_token"]

    _, projects = api.call("GET", "/api/v1/projects")
    project = next((p for p in projects.get("items", []) if p.get("slug") == "demo"), None)
    if project is None:
        _, project = api.call("POST", "/api/v1/projects", {
            "name": "Demo", "slug": "demo",
            "description": "A tool searches, an agent summarises: start here.",
        })
    pid = project["id"]

    tool = api.find_or_create("/api/v1/tools", pid, "web_search", {
        "description": "Searches the demo's search service on loopback.",
        "input_schema": {
            "type": "object", "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
        "http": {"method": "POST", "url": f"{services_url}/search", "timeout_ms": 5000},
    })
    agent = api.find_or_create("/api/v1/agents", pid, "summariser", {
        "description": "Summarises search results.",
        "model": "demo/digest-1",
        "system_prompt": "You summarise search results in three sentences, citing sources.",
    })
    # A made-up price for the demo model, so costs and budgets show real numbers.
    api.call("PUT", f"/api/v1/models/prices/demo/digest-1?project_id={pid}",
             {"input_per_mtok_usd": "3.00", "output_per_mtok_usd": "15.00"})
    api.find_or_create("/api/v1/policies", pid, "demo-budget", {
        "rules": {"budget": {"limit_usd": "1.00", "window": "day", "action": "alert"}},
    })
    workflow = api.find_or_create("/api/v1/workflows", pid, "research-digest", {
        "description": "Search a topic and summarise what comes back.",
        "input_schema": {
            "type": "object", "properties": {"topic": {"type": "string"}},
            "required": ["topic"],
        },
        "definition": {"steps": [
            {"key": "search", "kind": "tool", "tool_id": tool,
             "input": {"query": "{{ input.topic }}"}},
            {"key": "summarise", "kind": "agent", "agent_id": agent,
             "depends_on": ["search"], "input": "{{ steps.search.output }}"},
        ]},
    })

    _, run = api.call("POST", "/api/v1/runs", {
        "workflow_id": workflow, "input": {"topic": "agent orchestration"},
    })
    deadline = time.monotonic() + 60
    while run["status"] not in ("succeeded", "failed", "timed_out", "cancelled"):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
        _, run = api.call("GET", f"/api/v1/runs/{run['id']}")
    _, steps = api.call("GET", f"/api/v1/runs/{run['id']}/steps")
    print(f"demo: run {run['id']} {run['status']} "
          f"({run.get('tokens_in', 0)} tokens in, {run.get('tokens_out', 0)} out, "
          f"${run.get('cost_usd')})")
    for step in steps.get("items", []):
        print(f"demo:   {step['key']}: {step['status']}")
    print(f"demo: the console: {app_url.rstrip('/')}/console/runs/{run['id']}")
    print(f"demo: sign in as {EMAIL} with password {pw} (kept in {Path(data_dir) / 'demo_password'}); "
          f"API docs at {app_url}/docs")
    return 0 if run["status"] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
