drop function sparkops_workflow_for(uuid, integer, uuid);
create or replace function sparkops_policies_in_scope(project uuid, workflow uuid, agent uuid)
returns table (policy_id text, name text, rules jsonb, workflow_scoped boolean)
language sql stable as $$
    select p.policy_id::text, p.name, p.rules, p.scope_workflow_id is not null
    from policies p
    where p.project_id = project and p.enabled and p.deleted_at is null
      and (p.scope_workflow_id is null or p.scope_workflow_id = workflow)
      and (p.scope_agent_id is null or p.scope_agent_id = agent)
    order by p.policy_id
$$;
alter function sparkops_policies_in_scope(uuid, uuid, uuid) reset plan_cache_mode;
drop function sparkops_run_known(uuid, text, uuid);
alter function sparkops_tool_scope(uuid, uuid, uuid) reset plan_cache_mode;
alter function sparkops_run_write(uuid, text, boolean, jsonb, boolean, text, bigint, text, uuid,
    text, jsonb, jsonb, jsonb, bigint, float8, jsonb, boolean, jsonb, jsonb, jsonb, jsonb)
    reset plan_cache_mode;
