//! Staged rollouts: the [`planner`] decides (a pure state machine over
//! waves, gates and device reports), the [`driver`] carries it out
//! (stores it, feeds it the fleet's events and the clock, assigns and
//! publishes what it commands); [`schemas`] describes the planner's types
//! in the OpenAPI document.

pub mod driver;
pub mod planner;
pub mod schemas;

pub use driver::{CreateRollout, RolloutError, RolloutRecord, Rollouts, Selection};
pub use planner::*;
