//! Which route a request path selects, and which upstream URL it maps to.

pub mod balance;
mod pattern;
mod table;

pub use pattern::PathPattern;
pub use table::{Route, RouteTable};
