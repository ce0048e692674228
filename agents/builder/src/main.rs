//! Baton's builder agent
fn main() {}
