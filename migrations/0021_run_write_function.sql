-- A run's changes written by one function call (`sparkops_engine::store::Changes`).
--
-- Spin's Postgres interface has no prepared statements: every statement a component sends
-- is parsed and planned again on every call. The engine's write of a step's result with the
-- run's advance was one large statement that took longer to plan (0.68 ms) than to run
-- (0.64 ms), once per step. A PL/pgSQL function keeps the plans of its statements for the
-- life of the server session, and Spin pools its sessions, so the statement planned on each
-- call is the one-line call of this function.
--
-- The shape of a run event's webhook delivery lives here too, in small SQL functions the
-- engine's other statements call (`sparkops_engine::outbox`), so it has one definition.
--
-- And a tool step's policies with its tool (`sparkops_engine::policies::tool_scope`), read
-- by the executor before each call: a function too, so the executor can read the next
-- step's scope in the call that records the step before it.

-- The webhooks of `project` subscribed to `event_type`: enabled and not deleted.
create function sparkops_webhooks_told(project uuid, event_type text)
returns setof webhooks language sql stable as $$
    select * from webhooks w
    where w.project_id = project and w.enabled and w.deleted_at is null
      and event_type = any(w.event_types)
$$;

-- The Standard Webhooks body of an event: `{"type", "timestamp", "data"}`, stamped now
-- (RFC 3339, UTC, microseconds).
create function sparkops_webhook_payload(event_type text, data jsonb)
returns jsonb language sql stable as $$
    select jsonb_build_object('type', event_type,
        'timestamp', to_char(now() at time zone 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        'data', data)
$$;

-- The `data` of a run's webhook event: the run as it stands (its columns, after the change
-- the event tells of), the step and what the run event said.
create function sparkops_run_event_data(
    project_id uuid, run_id uuid, workflow_id uuid, workflow_version integer, schedule_id uuid,
    status text, step_key text, detail jsonb, error jsonb, tokens_in bigint, tokens_out bigint,
    cost_usd numeric
) returns jsonb language sql stable as $$
    select jsonb_build_object(
        'project_id', project_id, 'run_id', run_id, 'workflow_id', workflow_id,
        'workflow_version', workflow_version, 'schedule_id', schedule_id, 'status', status,
        'step_key', step_key, 'detail', detail, 'error', error,
        'tokens_in', tokens_in, 'tokens_out', tokens_out, 'cost_usd', cost_usd::text)
$$;

-- Writes a run's changes; the steps claimed, as a `jsonb` array of
-- `[step_key, attempt, lease_id]`, or null when nothing was written.
--
-- - `p_status`, `p_started`: the run's new status (null: unchanged) and whether it starts now.
-- - `p_events`: `[{kind, step, data, told}]`, logged in order, numbered on from the run's
--   `event_seq`; with `p_told`, a delivery is queued for every webhook subscribed to an
--   event's `told` type.
-- - `p_unmoved_status`, `p_unmoved_seq`: when set, the caller does not hold the run's lock
--   and writes only if the run still has this status and event count; null is returned when
--   it has moved. When null, the caller holds the lock.
-- - `p_rec_*`: an attempt's result (key null: none), written only while the step runs under
--   the lease `p_rec_lease`. Under the lock, a lease lost meanwhile writes nothing (null).
-- - `p_steps`: planned step changes, `[{key, status, error, deadline_s, lease_s}]`; each
--   step must be pending or ready.
-- - `p_ending`: the run ends with `p_output` and `p_error`; its steps whose status is in
--   `p_unfinished` (a `jsonb` array of statuses), other than those in `p_settled` (a `jsonb`
--   array of keys), are cancelled, and its trace is queued for export when its project
--   exports traces.
--
-- All or nothing: a run that had not moved but whose steps are not as expected raises an
-- error, so the call writes nothing.
create function sparkops_run_write(
    p_run uuid,
    p_status text,
    p_started boolean,
    p_events jsonb,
    p_told boolean,
    p_unmoved_status text,
    p_unmoved_seq bigint,
    p_rec_key text,
    p_rec_lease uuid,
    p_rec_status text,
    p_rec_input jsonb,
    p_rec_output jsonb,
    p_rec_error jsonb,
    p_rec_duration_ms bigint,
    p_rec_wait_ms float8,
    p_steps jsonb,
    p_ending boolean,
    p_output jsonb,
    p_error jsonb,
    p_settled jsonb,
    p_unfinished jsonb
) returns jsonb language plpgsql as $$
declare
    r runs;
    changed bigint;
    claimed jsonb := '[]';
begin
    if p_unmoved_status is null and p_rec_key is not null then
        perform 1 from run_steps
        where run_id = p_run and step_key = p_rec_key and lease_id = p_rec_lease
          and status = 'running';
        if not found then
            return null;
        end if;
    end if;

    update runs set event_seq = event_seq + jsonb_array_length(p_events),
        status = coalesce(p_status, status),
        started_at = case when p_started then now() else started_at end,
        updated_at = case when p_status is not null or p_started then now() else updated_at end,
        output = case when p_ending then p_output else output end,
        error = case when p_ending then p_error else error end,
        finished_at = case when p_ending then now() else finished_at end
    where run_id = p_run
      and (p_unmoved_status is null or (status = p_unmoved_status and event_seq = p_unmoved_seq))
    returning * into r;
    if not found then
        return null;
    end if;

    if p_rec_key is not null then
        update run_steps set status = p_rec_status, input = p_rec_input, output = p_rec_output,
            error = p_rec_error, duration_ms = p_rec_duration_ms, lease_id = null,
            lease_expires_at = null, updated_at = now(),
            finished_at = case when p_rec_status = 'retrying' then null else now() end,
            next_attempt_at = case when p_rec_status = 'retrying'
                then now() + make_interval(secs => p_rec_wait_ms / 1000) else null end
        where run_id = p_run and step_key = p_rec_key and lease_id = p_rec_lease
          and status = 'running';
        get diagnostics changed = row_count;
        if changed <> 1 then
            raise exception 'run %: step % is not running under lease %', p_run, p_rec_key, p_rec_lease;
        end if;
    end if;

    -- A skipped step gets its reason and keeps its attempt and times; a waiting or claimed
    -- one starts an attempt (with its deadline); a claimed one gets a fresh lease.
    if jsonb_array_length(p_steps) > 0 then
        with planned as (
            update run_steps s set status = coalesce(p.status, s.status),
                error = case when p.status = 'skipped' then p.error else s.error end,
                attempt = s.attempt + case when p.status in ('waiting', 'running') then 1 else 0 end,
                lease_id = case when p.status = 'running' then gen_random_uuid() else s.lease_id end,
                deadline_at = coalesce(now() + make_interval(secs => p.deadline_s), s.deadline_at),
                lease_expires_at = coalesce(now() + make_interval(secs => p.lease_s), s.lease_expires_at),
                started_at = case when p.status in ('waiting', 'running')
                    then coalesce(s.started_at, now()) else s.started_at end,
                updated_at = now()
            from jsonb_to_recordset(p_steps)
                as p(key text, status text, error jsonb, deadline_s float8, lease_s float8)
            where s.run_id = p_run and s.step_key = p.key and s.status in ('pending', 'ready')
            returning s.step_key, s.attempt, s.lease_id
        )
        select count(*), coalesce(jsonb_agg(jsonb_build_array(step_key, attempt, lease_id::text))
                filter (where lease_id is not null), '[]')
        into changed, claimed
        from planned;
        if changed <> jsonb_array_length(p_steps) then
            raise exception 'run %: % of % planned steps were pending or ready', p_run, changed,
                jsonb_array_length(p_steps);
        end if;
    end if;

    if p_ending then
        update run_steps set status = 'cancelled', lease_id = null, finished_at = now(),
            updated_at = now()
        where run_id = p_run and p_unfinished ? status and not (p_settled ? step_key);
        insert into trace_exports (run_id, project_id, next_attempt_at)
        select r.run_id, r.project_id, date_trunc('second', now())
        from projects p
        where p.project_id = r.project_id and p.trace_endpoint is not null and p.deleted_at is null
        on conflict (run_id) do nothing;
    end if;

    insert into run_events (run_id, seq, kind, step_key, data)
    select p_run, r.event_seq - jsonb_array_length(p_events) + e.n, e.value ->> 'kind',
        e.value ->> 'step', e.value -> 'data'
    from jsonb_array_elements(p_events) with ordinality as e(value, n);
    if p_told then
        insert into webhook_deliveries
            (delivery_id, webhook_id, project_id, event_type, payload, next_attempt_at)
        select sparkops_uuid_v7(), w.webhook_id, w.project_id, e.value ->> 'told',
            sparkops_webhook_payload(e.value ->> 'told', sparkops_run_event_data(
                r.project_id, r.run_id, r.workflow_id, r.workflow_version, r.schedule_id,
                r.status, e.value ->> 'step', e.value -> 'data', r.error, r.tokens_in,
                r.tokens_out, r.cost_usd)),
            date_trunc('second', now())
        from jsonb_array_elements(p_events) with ordinality as e(value, n),
            sparkops_webhooks_told(r.project_id, e.value ->> 'told') w
        order by e.n;
    end if;
    return claimed;
end
$$;

-- The enabled policies in scope of a step of `workflow` (and, for an agent step, of
-- `agent`; null for other steps), by id.
create function sparkops_policies_in_scope(project uuid, workflow uuid, agent uuid)
returns table (policy_id text, name text, rules jsonb, workflow_scoped boolean)
language sql stable as $$
    select p.policy_id::text, p.name, p.rules, p.scope_workflow_id is not null
    from policies p
    where p.project_id = project and p.enabled and p.deleted_at is null
      and (p.scope_workflow_id is null or p.scope_workflow_id = workflow)
      and (p.scope_agent_id is null or p.scope_agent_id = agent)
    order by p.policy_id
$$;

-- What a tool step of `workflow` needs before its call: `{"policies": [{id, name, rules,
-- workflow_scoped}], "tool": {method, url, headers, timeout_ms, input_schema,
-- output_schema}}`, the tool null when the project has no such live tool.
create function sparkops_tool_scope(project uuid, workflow uuid, tool uuid)
returns jsonb language plpgsql stable as $$
begin
    return jsonb_build_object(
        'policies', coalesce((
            select jsonb_agg(jsonb_build_object('id', s.policy_id, 'name', s.name,
                'rules', s.rules, 'workflow_scoped', s.workflow_scoped) order by s.policy_id)
            from sparkops_policies_in_scope(project, workflow, null) s), '[]'),
        'tool', (
            select jsonb_build_object('method', t.method, 'url', t.url, 'headers', t.headers,
                'timeout_ms', t.timeout_ms, 'input_schema', t.input_schema,
                'output_schema', t.output_schema)
            from tools t
            where t.tool_id = tool and t.project_id = project and t.deleted_at is null));
end
$$;
