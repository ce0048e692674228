//! Baton's deployer agent
fn main() {}
