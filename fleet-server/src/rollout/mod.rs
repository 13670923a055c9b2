//! Staged rollouts of a model version or of an agent release: the
//! [`planner`] decides (a pure state machine over waves, gates and device
//! reports), the [`driver`] carries it out (stores it, feeds it the
//! fleet's events and the clock; its dispatcher assigns and publishes what
//! it commands); [`schemas`] describes the planner's types in the OpenAPI
//! document.

mod dispatch;
pub mod driver;
pub mod planner;
mod replicas;
pub mod schemas;

pub use driver::{AgentRollout, CreateRollout, RolloutError, RolloutRecord, Rollouts, Selection};
pub use planner::*;
