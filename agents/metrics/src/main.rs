//! Baton's metrics agent
fn main() {}
