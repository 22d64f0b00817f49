-- Accounts and tenancy: users, refresh-token families, projects, memberships, API keys,
-- and the idempotency records every creating POST uses.

create table users (
    user_id uuid primary key,
    email text not null check (email = lower(email) and length(email) between 3 and 254),
    name text not null check (length(name) between 1 and 200),
    password_hash text not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
-- Emails are stored lowercased; the index makes uniqueness case-insensitive even so.
create unique index users_email_key on users (lower(email));

-- One family per login; refresh tokens rotate within it. Reusing a rotated token revokes
-- the whole family (the token was stolen, or the client is broken).
create table refresh_token_families (
    family_id uuid primary key,
    user_id uuid not null references users (user_id) on delete cascade,
    revoked_at timestamptz,
    revoked_reason text,
    created_at timestamptz not null default now()
);
create index refresh_token_families_user_idx on refresh_token_families (user_id);

create table refresh_tokens (
    token_hash text primary key,
    family_id uuid not null references refresh_token_families (family_id) on delete cascade,
    rotated_at timestamptz,
    expires_at timestamptz not null,
    created_at timestamptz not null default now()
);
create index refresh_tokens_family_idx on refresh_tokens (family_id);

create table projects (
    project_id uuid primary key,
    owner_id uuid not null references users (user_id),
    name text not null check (length(name) between 1 and 200),
    slug text not null check (slug ~ '^[a-z0-9][a-z0-9-]{1,62}[a-z0-9]$'),
    description text check (length(description) <= 2000),
    version integer not null default 1,
    deleted_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now()
);
-- Slugs are unique per creating user among live projects.
create unique index projects_owner_slug_key on projects (owner_id, slug) where deleted_at is null;

create table memberships (
    project_id uuid not null references projects (project_id) on delete cascade,
    user_id uuid not null references users (user_id) on delete cascade,
    role text not null check (role in ('owner', 'admin', 'member', 'viewer')),
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    primary key (project_id, user_id)
);
create index memberships_user_idx on memberships (user_id);

create table api_keys (
    api_key_id uuid primary key,
    project_id uuid not null references projects (project_id) on delete cascade,
    created_by uuid not null references users (user_id),
    name text not null check (length(name) between 1 and 200),
    prefix text not null,
    key_hash text not null,
    role text not null check (role in ('owner', 'admin', 'member', 'viewer')),
    expires_at timestamptz,
    revoked_at timestamptz,
    created_at timestamptz not null default now()
);
create unique index api_keys_prefix_key on api_keys (prefix);
create index api_keys_project_idx on api_keys (project_id, api_key_id desc);

-- `Idempotency-Key` on creating POSTs: the first response is stored in the same
-- transaction as the write, so a retry gets it back and the write happens once.
create table idempotency_keys (
    principal text not null,
    route text not null,
    key text not null check (length(key) between 1 and 255),
    request_hash text not null,
    status integer,
    response jsonb,
    location text,
    created_at timestamptz not null default now(),
    primary key (principal, route, key)
);
