//! Baton's integration tests
