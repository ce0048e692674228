//! Baton's command-line interface
fn main() {}
