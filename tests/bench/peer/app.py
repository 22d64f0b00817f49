"""The peer of the request-path benchmark: the same three run endpoints, built the way
Spark-Ops' seed stack was (FastAPI, SQLAlchemy 2 async over asyncpg, PyJWT, uvicorn with
two workers), reading the app's own tables on the same Postgres.

It does what the app's handlers do for these routes, without rate limits:
- `GET /api/v1/runs/{id}`: check the access token, then one query joining the run, its
  project, the caller's membership and its trace export, with the same columns (the step
  counts included); `404` when the caller is not a member.
- `GET /api/v1/runs?project_id=`: the membership, then a page of 50 runs, newest first.
- `POST /api/v1/runs`: the workflow's current version and the membership in one query, then
  the run and its steps inserted in one transaction (into `bench_peer_runs` and
  `bench_peer_run_steps`, copies of the app's tables, so the app's engine never sees them).

Settings come from the environment: `DATABASE_URL` (postgres://...), `JWT_SECRET`.
"""

import json
import os
import uuid

import jwt
from fastapi import FastAPI, Header, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

DATABASE_URL = os.environ["DATABASE_URL"].replace("postgres://", "postgresql+asyncpg://", 1)
JWT_SECRET = os.environ["JWT_SECRET"]

engine = create_async_engine(DATABASE_URL, pool_size=16, max_overflow=16)
app = FastAPI()

RUN_COLUMNS = """
    r.run_id, r.project_id, r.workflow_id, r.workflow_version, r.status, r.input, r.output,
    r.error, r.retry_of, r.schedule_id, r.scheduled_for, r.tokens_in, r.tokens_out,
    r.cost_usd, r.unpriced_calls, r.started_at, r.finished_at, r.created_at, r.updated_at,
    (select coalesce(jsonb_object_agg(s.status, s.n), '{}'::jsonb) from
       (select status, count(*) as n from run_steps where run_id = r.run_id group by status) s)
       as steps,
    r.payloads_pruned_at, r.trigger_id, r.paused_at, r.max_cost_usd, r.reserved_usd,
    r.estimated_usd
"""

WRITERS = {"owner", "admin", "member"}


def problem(status: int, title: str, detail: str) -> JSONResponse:
    return JSONResponse(
        {"type": "about:blank", "title": title, "status": status, "detail": detail},
        status_code=status,
        media_type="application/problem+json",
    )


class Refused(Exception):
    def __init__(self, status: int, title: str, detail: str):
        self.status, self.title, self.detail = status, title, detail


@app.exception_handler(Refused)
async def refused(_request, e: Refused):
    return problem(e.status, e.title, e.detail)


def user_of(authorization: str | None) -> str:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise Refused(401, "Unauthorized", "a bearer token is required")
    try:
        claims = jwt.decode(
            authorization[7:].strip(),
            JWT_SECRET,
            algorithms=["HS256"],
            audience="sparkops-api",
            issuer="sparkops",
            leeway=30,
            options={"require": ["exp", "sub", "jti"]},
        )
    except jwt.PyJWTError:
        raise Refused(401, "Unauthorized", "the access token is invalid or expired")
    return claims["sub"]


def parse_uuid(raw: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise Refused(422, "Unprocessable Content", f"{what} must be a UUID")


def run_json(row) -> dict:
    r = row._mapping
    duration = None
    if r["started_at"] and r["finished_at"]:
        duration = int((r["finished_at"] - r["started_at"]).total_seconds() * 1000)
    money = lambda v: None if v is None else f"{v:.6f}"  # noqa: E731
    return {
        "id": str(r["run_id"]),
        "project_id": str(r["project_id"]),
        "workflow_id": str(r["workflow_id"]),
        "workflow_version": r["workflow_version"],
        "status": r["status"],
        "input": r["input"],
        "output": r["output"],
        "error": r["error"],
        "retry_of": r["retry_of"] and str(r["retry_of"]),
        "schedule_id": r["schedule_id"] and str(r["schedule_id"]),
        "scheduled_for": r["scheduled_for"],
        "tokens_in": r["tokens_in"],
        "tokens_out": r["tokens_out"],
        "cost_usd": money(r["cost_usd"]),
        "unpriced_calls": r["unpriced_calls"],
        "started_at": r["started_at"],
        "finished_at": r["finished_at"],
        "duration_ms": duration,
        "created_at": r["created_at"],
        "updated_at": r["updated_at"],
        "steps": r["steps"],
        "payloads_pruned_at": r["payloads_pruned_at"],
        "trigger_id": r["trigger_id"] and str(r["trigger_id"]),
        "paused_at": r["paused_at"],
        "max_cost_usd": money(r["max_cost_usd"]),
        "reserved_usd": money(r["reserved_usd"]),
        "estimated_usd": money(r["estimated_usd"]),
    }


@app.get("/api/v1/runs/{run_id}")
async def get_run(run_id: str, authorization: str | None = Header(None)):
    user = user_of(authorization)
    rid = parse_uuid(run_id, "run")
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    f"""select {RUN_COLUMNS}, m.role, t.status as export_status,
                          t.attempts, t.last_error, t.exported_at
                        from runs r
                        join projects p on p.project_id = r.project_id and p.deleted_at is null
                        join memberships m on m.project_id = r.project_id and m.user_id = :user
                        left join trace_exports t on t.run_id = r.run_id
                        where r.run_id = :run"""
                ),
                {"user": uuid.UUID(user), "run": rid},
            )
        ).first()
    if row is None:
        raise Refused(404, "Not Found", f"no run {rid}")
    run = run_json(row)
    m = row._mapping
    run["trace_export"] = m["export_status"] and {
        "status": m["export_status"],
        "attempts": m["attempts"],
        "last_error": m["last_error"],
        "exported_at": m["exported_at"],
    }
    return run


@app.get("/api/v1/runs")
async def list_runs(
    project_id: str = Query(...),
    limit: int = Query(50, ge=1, le=200),
    authorization: str | None = Header(None),
):
    user = user_of(authorization)
    pid = parse_uuid(project_id, "project_id")
    async with engine.connect() as conn:
        member = (
            await conn.execute(
                text(
                    """select m.role from memberships m
                       join projects p on p.project_id = m.project_id and p.deleted_at is null
                       where m.project_id = :project and m.user_id = :user"""
                ),
                {"project": pid, "user": uuid.UUID(user)},
            )
        ).first()
        if member is None:
            raise Refused(404, "Not Found", f"no project {pid}")
        rows = (
            await conn.execute(
                text(
                    f"""select {RUN_COLUMNS} from runs r where r.project_id = :project
                        order by r.run_id desc limit :limit"""
                ),
                {"project": pid, "limit": limit + 1},
            )
        ).all()
    items = [run_json(r) for r in rows[:limit]]
    more = len(rows) > limit
    return {"items": items, "next_cursor": items[-1]["id"] if more else None}


class NewRun(BaseModel):
    workflow_id: uuid.UUID
    input: dict = {}


@app.post("/api/v1/runs", status_code=201)
async def create_run(body: NewRun, authorization: str | None = Header(None)):
    user = uuid.UUID(user_of(authorization))
    async with engine.begin() as conn:
        found = (
            await conn.execute(
                text(
                    """select w.project_id, w.version, v.definition, m.role
                       from workflows w
                       join workflow_versions v
                         on v.workflow_id = w.workflow_id and v.version = w.version
                       join projects p on p.project_id = w.project_id and p.deleted_at is null
                       join memberships m on m.project_id = w.project_id and m.user_id = :user
                       where w.workflow_id = :workflow and w.deleted_at is null"""
                ),
                {"workflow": body.workflow_id, "user": user},
            )
        ).first()
        if found is None:
            raise Refused(404, "Not Found", f"no workflow {body.workflow_id}")
        if found.role not in WRITERS:
            raise Refused(403, "Forbidden", "your role cannot start runs")
        run_id = uuid.uuid4()
        row = (
            await conn.execute(
                text(
                    """insert into bench_peer_runs
                         (run_id, project_id, workflow_id, workflow_version, input, created_by)
                       values (:run, :project, :workflow, :version, cast(:input as jsonb), :user)
                       returning *, '{}'::jsonb as steps"""
                ),
                {
                    "run": run_id,
                    "project": found.project_id,
                    "workflow": body.workflow_id,
                    "version": found.version,
                    "input": json.dumps(body.input),
                    "user": user,
                },
            )
        ).first()
        await conn.execute(
            text(
                """insert into bench_peer_run_steps (run_id, step_key, kind)
                   select :run, s->>'key', s->>'kind'
                   from jsonb_array_elements(cast(:definition as jsonb)->'steps') s"""
            ),
            {"run": run_id, "definition": json.dumps(found.definition)},
        )
    return JSONResponse(
        content=jsonable_encoder(run_json(row)),
        status_code=201,
        headers={"location": f"/api/v1/runs/{run_id}"},
    )
