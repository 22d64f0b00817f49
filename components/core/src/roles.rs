//! Roles and what each may do (API.md "Tenancy"): viewers read; members also run and write
//! agents, tools, workflows and schedules; admins also manage policies, members, keys and
//! secrets; owners also delete the project.

use std::fmt;

use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Viewer,
    Member,
    Admin,
    Owner,
}

/// An action on a project's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    /// Start, cancel, retry and approve runs; write agents, tools, workflows, schedules.
    Write,
    /// Policies, members, API keys, secrets, project settings.
    Administer,
    DeleteProject,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Member, Role::Admin, Role::Owner];

    pub fn parse(s: &str) -> Option<Role> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Member => "member",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn can(self, action: Action) -> bool {
        let needed = match action {
            Action::Read => Role::Viewer,
            Action::Write => Role::Member,
            Action::Administer => Role::Admin,
            Action::DeleteProject => Role::Owner,
        };
        self >= needed
    }

    /// `Ok` when the role allows `action`; else the `403` naming both.
    pub fn require(self, action: Action) -> Result<(), ApiError> {
        if self.can(action) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "the {self} role cannot do this"
            )))
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_gets_exactly_its_actions() {
        use Action::*;
        let table = [
            (Role::Viewer, [true, false, false, false]),
            (Role::Member, [true, true, false, false]),
            (Role::Admin, [true, true, true, false]),
            (Role::Owner, [true, true, true, true]),
        ];
        for (role, allowed) in table {
            let got = [Read, Write, Administer, DeleteProject].map(|a| role.can(a));
            assert_eq!(got, allowed, "{role}");
        }
    }

    #[test]
    fn roles_parse_from_their_names_only() {
        assert_eq!(Role::parse("admin"), Some(Role::Admin));
        assert_eq!(Role::parse("Admin"), None);
        assert_eq!(Role::parse("root"), None);
    }
}
