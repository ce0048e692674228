//! Baton's shared agent runtime
