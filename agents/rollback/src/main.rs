//! Baton's rollback agent
fn main() {}
