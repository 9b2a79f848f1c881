//! stub
pub fn classify() {}
pub struct RetryBudget;
pub struct RetryLayer;
