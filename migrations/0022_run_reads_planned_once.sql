-- The engine's per-step statements keep their plans.
--
-- The run's write and a tool step's scope look up rows by their keys alone, so one plan
-- suits every call. Postgres otherwise plans each of their statements anew on every call
-- once its statistics make a call-specific plan look cheaper than the generic one, which it
-- decides per server session: measured in the engine's benchmark, after the tables had
-- grown, the write's update of the steps it plans was planned on every call: 0.19 ms a
-- step, on top of its 0.12 ms run.
alter function sparkops_run_write(uuid, text, boolean, jsonb, boolean, text, bigint, text, uuid,
    text, jsonb, jsonb, jsonb, bigint, float8, jsonb, boolean, jsonb, jsonb, jsonb, jsonb)
    set plan_cache_mode = force_generic_plan;
alter function sparkops_tool_scope(uuid, uuid, uuid) set plan_cache_mode = force_generic_plan;

-- The run as the engine decides over it: its input, pinned definition, steps (`[[key,
-- status, attempt, output when succeeded]]`, by key), status and event count, and its
-- project and workflow. With `p_step` and `p_lease`, also the attempt the lease is for
-- while it holds (the step running under it, not expired) and, for a tool step, its scope
-- (`sparkops_tool_scope`): what an executor reads before it runs a dispatched step. No row
-- when there is no such run.
--
-- A function, where it was a statement the engine sent, because Spin plans every statement
-- it is sent on every call (0.4-0.5 ms for this one, against 0.3 ms to run it) and a
-- function's statements are planned once per server session.
create function sparkops_run_known(p_run uuid, p_step text default null,
    p_lease uuid default null)
returns table (input jsonb, definition jsonb, steps jsonb, status text, event_seq integer,
    project_id text, workflow_id text, attempt integer, scope jsonb)
language plpgsql stable set plan_cache_mode = force_generic_plan as $$
begin
    return query
    select r.input, v.definition, coalesce((
            select jsonb_agg(jsonb_build_array(s.step_key, s.status, s.attempt,
                case when s.status = 'succeeded' then s.output end) order by s.step_key)
            from run_steps s where s.run_id = r.run_id), '[]'::jsonb),
        r.status, r.event_seq, r.project_id::text, r.workflow_id::text, (
            select s.attempt from run_steps s
            where s.run_id = r.run_id and s.step_key = p_step and s.status = 'running'
              and s.lease_id = p_lease and s.lease_expires_at > now()), (
            select sparkops_tool_scope(r.project_id, r.workflow_id, (st ->> 'tool_id')::uuid)
            from jsonb_array_elements(v.definition -> 'steps') st
            where p_step is not null and st ->> 'key' = p_step and st ->> 'kind' = 'tool'
              and st ->> 'tool_id' ~ '^[0-9a-fA-F-]{36}$')
    from runs r
    join workflow_versions v on v.workflow_id = r.workflow_id and v.version = r.workflow_version
    where r.run_id = p_run;
end
$$;

-- The policies in scope, as before, but no longer inlined into the statement that calls
-- it, which Spin planned whole on every call (0.22 ms, against 0.01 ms to run it): as a
-- PL/pgSQL function its statement is planned once per server session.
create or replace function sparkops_policies_in_scope(project uuid, workflow uuid, agent uuid)
returns table (policy_id text, name text, rules jsonb, workflow_scoped boolean)
language plpgsql stable set plan_cache_mode = force_generic_plan as $$
begin
    return query
    select p.policy_id::text, p.name, p.rules, p.scope_workflow_id is not null
    from policies p
    where p.project_id = project and p.enabled and p.deleted_at is null
      and (p.scope_workflow_id is null or p.scope_workflow_id = workflow)
      and (p.scope_agent_id is null or p.scope_agent_id = agent)
    order by p.policy_id;
end
$$;

-- A live workflow (in a live project) with its version `p_version` (its current one when
-- null) and `p_user`'s role in its project: what `POST /runs` reads before it starts a
-- run. No row when there is no such workflow; a null version when it has no such version;
-- a null role when the user is not a member. A function for the reason above (its
-- statement took 0.35 ms to plan under Spin, against 0.05 ms to run).
create function sparkops_workflow_for(p_workflow uuid, p_version integer, p_user uuid)
returns table (project_id text, version integer, timeout_s integer, definition jsonb,
    input_schema jsonb, role text)
language plpgsql stable set plan_cache_mode = force_generic_plan as $$
begin
    return query
    select w.project_id::text, v.version, w.timeout_s, v.definition, v.input_schema, m.role
    from workflows w join projects p on p.project_id = w.project_id
    left join workflow_versions v
        on v.workflow_id = w.workflow_id and v.version = coalesce(p_version, w.version)
    left join memberships m on m.project_id = w.project_id and m.user_id = p_user
    where w.workflow_id = p_workflow and w.deleted_at is null and p.deleted_at is null;
end
$$;
