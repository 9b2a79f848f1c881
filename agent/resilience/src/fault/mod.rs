//! stub
pub struct FaultLayer;
