-- Each decision on an approval step: who (a user, or `link` for a link of a step that names
-- no approvers), how (the API or a link) and when. A step with a quorum passes once that
-- many distinct approvers approve; one rejection fails it. An approver decides once.
create table run_step_approvals (
    run_id uuid not null references runs (run_id) on delete cascade,
    step_key text not null,
    approver text not null check (length(approver) <= 64),
    approved boolean not null,
    comment text check (length(comment) <= 2000),
    via text not null check (via in ('api', 'link')),
    decided_at timestamptz not null default now(),
    primary key (run_id, step_key, approver),
    foreign key (run_id, step_key) references run_steps (run_id, step_key) on delete cascade
);
