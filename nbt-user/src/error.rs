//! The errors a user sees for bad input: nbt exits with status 2 for both. They sit at the bottom
//! of the tree so that every layer can refuse a value the same way.

use std::fmt;

/// A value that does not parse, or is out of range. Shown to the user; nbt exits with status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError {
    pub flag: String,
    pub value: String,
    pub problem: String,
    pub accepted: &'static str,
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid value '{}' for {}: {}; accepted: {}",
            self.value, self.flag, self.problem, self.accepted
        )
    }
}

impl std::error::Error for UsageError {}

/// Why a plan could not be made. Always a usage error: exit status 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanError(pub String);

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlanError {}

impl From<UsageError> for PlanError {
    fn from(e: UsageError) -> Self {
        PlanError(e.to_string())
    }
}
