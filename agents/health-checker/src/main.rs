//! Baton's health-checker agent
fn main() {}
