//! The seam every changing module goes through: observe the host, build a
//! [`Plan`] (a value: the files to rewrite and the module's own actions),
//! apply it unless in check mode, and turn it into the result here, in one
//! place: `changed`, the message ("would ..." in check mode), the actions
//! and each file's diff.
//!
//! A plan is built from what was observed and nothing else, so a module's
//! decisions can be unit-tested by building its plan from observations.

use anyhow::Result;

use crate::files::FilePlan;
use crate::protocol::{Context, Outcome};

/// One of a module's own changes, besides its files: creating a slot,
/// setting a role, starting a unit.
pub trait Action {
    /// What it does, as a phrase that reads after "would": "create the
    /// replication slot hapair_10_0_0_2".
    fn describe(&self) -> String;
}

impl Action for String {
    fn describe(&self) -> String {
        self.clone()
    }
}

/// What a run will change.
#[derive(Debug)]
pub struct Plan<A> {
    /// The files it rewrites, each with its diff.
    pub files: FilePlan,
    /// The module's own actions, in the order it applies them.
    pub actions: Vec<A>,
}

impl<A> Default for Plan<A> {
    fn default() -> Self {
        Plan {
            files: FilePlan::default(),
            actions: Vec::new(),
        }
    }
}

impl<A: Action> Plan<A> {
    pub fn new(files: FilePlan) -> Plan<A> {
        Plan {
            files,
            actions: Vec::new(),
        }
    }

    pub fn push(&mut self, action: A) {
        self.actions.push(action);
    }

    /// Nothing to do: the host is as it should be.
    pub fn is_empty(&self) -> bool {
        self.files.changes.is_empty() && self.actions.is_empty()
    }

    /// One phrase per change: the files' writes, then the actions.
    pub fn describe(&self) -> Vec<String> {
        self.files
            .changes
            .iter()
            .map(|c| c.action.clone())
            .chain(self.actions.iter().map(Action::describe))
            .collect()
    }

    /// Applies the plan with `apply`, unless it is empty or the run is in
    /// check mode, and says what was (or would be) done. `apply` gets the
    /// context (for warnings) and returns notes for the message, such as
    /// what it restarted; `unchanged` is the message when there is nothing
    /// to do.
    pub fn run(
        self,
        ctx: &mut Context,
        unchanged: impl Into<String>,
        apply: impl FnOnce(&Plan<A>, &mut Context) -> Result<Vec<String>>,
    ) -> Result<Outcome> {
        let described = self.describe();
        let msg = if self.is_empty() {
            unchanged.into()
        } else if ctx.check_mode {
            format!("would {}", described.join(", "))
        } else {
            let notes = apply(&self, ctx)?;
            let mut msg = described.join(", ");
            if !notes.is_empty() {
                msg = format!("{msg}; {}", notes.join("; "));
            }
            msg
        };
        let mut outcome = Outcome::new(!self.is_empty(), msg).with("actions", &described);
        for change in self.files.changes {
            outcome = outcome.with_diff(change.diff);
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(actions: &[&str]) -> Plan<String> {
        let mut plan = Plan::default();
        for action in actions {
            plan.push(action.to_string());
        }
        plan
    }

    #[test]
    fn check_mode_says_would_and_applies_nothing() {
        let mut ctx = Context::default();
        ctx.check_mode = true;
        let outcome = plan(&["create the slot", "record the host"])
            .run(&mut ctx, "nothing to do", |_, _| {
                panic!("applied in check mode")
            })
            .unwrap();
        assert!(outcome.changed);
        assert_eq!(outcome.msg, "would create the slot, record the host");
    }

    #[test]
    fn a_run_applies_once_and_says_what_it_did() {
        let mut applied = 0;
        let outcome = plan(&["create the slot"])
            .run(&mut Context::default(), "nothing to do", |plan, _| {
                applied += plan.actions.len();
                Ok(vec!["reloaded postgresql".into()])
            })
            .unwrap();
        assert_eq!(applied, 1);
        assert!(outcome.changed);
        assert_eq!(outcome.msg, "create the slot; reloaded postgresql");
    }

    #[test]
    fn an_empty_plan_changes_nothing() {
        let outcome = plan(&[])
            .run(&mut Context::default(), "already done", |_, _| {
                panic!("applied an empty plan")
            })
            .unwrap();
        assert!(!outcome.changed);
        assert_eq!(outcome.msg, "already done");
    }
}
